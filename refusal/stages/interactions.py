"""Interaction discovery: score distinct sampled ablation masks over M plus other features
active on the prompt (candidates first, then the strongest), and fit the factorization
machine and its additive baseline (refusal.fm)."""

from __future__ import annotations

import shutil

import torch

from refusal import fm
from refusal.context import Context, Work
from refusal.records import InteractionsRecord
from refusal.stages.stage import Stage, jailbroken


def run(ctx: Context, work: Work) -> InteractionsRecord:
    cfg, greedy, prompt_id = ctx.cfg.search.fm, work.result.greedy, work.result.prompt_id
    assert greedy is not None
    minimal = greedy.minimal
    candidates = [c.feature for c in greedy.candidates]
    extra = fm.extra_features(minimal, candidates, work.clean, cfg.max_extra)
    features = minimal + extra
    masks = fm.sample_masks(
        cfg.n_masks, len(minimal), len(extra), cfg.p_extra, ctx.cfg.seed + prompt_id
    )
    scores = work.probe.score(features, masks)
    out_dir = ctx.out.path / "fm" / f"prompt_{prompt_id}"
    shutil.rmtree(out_dir, ignore_errors=True)  # left by a killed run: train afresh
    readout = fm.fit(
        masks,
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
    # the FM's data, to refit or study it without scoring the masks again
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"features": [str(f) for f in features], "masks": masks, "scores": scores},
        out_dir / "masks.pt",
    )
    return InteractionsRecord(
        prompt_id=prompt_id,
        features=features,
        n_masks=cfg.n_masks,
        flip_fraction=(scores < ctx.flip_threshold).float().mean().item(),
        **dict(readout),
    )


STAGE = Stage("interactions", ("greedy", "verification"), run, jailbroken)
