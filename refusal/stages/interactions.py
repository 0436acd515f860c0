"""Interaction discovery: score distinct sampled ablation masks over M plus other features
active on the prompt (candidates first, then the strongest), and fit the factorization
machine and its additive baseline (refusal.fm).

The masks are scored `search.fm.sample_step` at a time and both models refitted after
each step; sampling stops once the interaction gain's interval lies below
`search.fm.stop_gain` (refusal.fm.settled) or all `n_masks` are scored."""

from __future__ import annotations

import shutil

import torch

from refusal import fm
from refusal.context import Context, Work
from refusal.records import FMReadout, InteractionsRecord
from refusal.stages.stage import Stage, jailbroken


def run(ctx: Context, work: Work) -> InteractionsRecord:
    cfg, greedy, prompt_id = ctx.cfg.search.fm, work.result.greedy, work.result.prompt_id
    assert greedy is not None
    minimal = greedy.minimal
    extra = fm.extra_features(minimal, greedy.candidates, work.clean, cfg.max_extra)
    features = minimal + extra
    masks = fm.sample_masks(
        cfg.n_masks, len(minimal), len(extra), cfg.p_extra, ctx.cfg.seed + prompt_id
    )
    out_dir = ctx.out.path / "fm" / f"prompt_{prompt_id}"
    scores = torch.empty(0)
    readout: FMReadout | None = None
    fits = 0
    for end in fm.fit_points(len(masks), cfg.sample_step):
        fits += 1
        scores = torch.cat([scores, work.probe.score(features, masks[len(scores) : end])])
        # a killed run's checkpoints, or the previous fit's: train afresh
        shutil.rmtree(out_dir, ignore_errors=True)
        readout = fm.fit(
            masks[:end],
            scores,
            ctx.flip_threshold,
            features,
            len(minimal),
            cfg,
            ctx.cfg.trainer,
            out_dir,
            logger=ctx.tracker.fm_loggers(prompt_id),
            seed=ctx.cfg.seed,
        )
        if fm.settled(readout, cfg.stop_gain):
            break
    assert readout is not None
    # the FM's data, to refit or study it without scoring the masks again
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"features": [str(f) for f in features], "masks": masks[: len(scores)], "scores": scores},
        out_dir / "masks.pt",
    )
    return InteractionsRecord(
        prompt_id=prompt_id,
        features=features,
        n_masks=cfg.n_masks,
        fits=fits,
        flip_fraction=(scores < ctx.flip_threshold).float().mean().item(),
        **dict(readout),
    )


STAGE = Stage("interactions", ("greedy", "verification"), run, jailbroken)
