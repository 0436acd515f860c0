"""Random control: do latents drawn at random flip the prompt as M does?

Each draw takes, at every layer M touches, as many latents as M has there, uniformly
among those active on the prompt and outside M. All draws are scored as one batch of
masks through the engine; the draws whose score flips are generated and judged (up to
`controls.random.judge_max` of them), so the control says both how often random sets of
M's size and layers move the opening score and how often that is a jailbreak.
"""

from __future__ import annotations

from collections import Counter

import torch

from refusal.context import Context, Work
from refusal.features import Feature
from refusal.judge import Verdict
from refusal.records import RandomControlRecord
from refusal.stages.stage import Stage, flipped


def draws(
    clean: dict[int, torch.Tensor],
    minimal: list[Feature],
    n_draws: int,
    min_activation: float,
    generator: torch.Generator,
) -> list[list[Feature]]:
    """`n_draws` random sets shaped like M (its count per layer), of latents active on
    the prompt (clean latents (positions, d_sae) per layer, at the positions an edit acts
    on: PromptProbe.latents) and never of M."""
    per_layer = Counter(f.layer for f in minimal)
    pools = {}
    for layer, count in per_layer.items():
        active = clean[layer].max(0).values > min_activation
        active[[f.latent for f in minimal if f.layer == layer]] = False
        pools[layer] = active.nonzero().flatten()
        if len(pools[layer]) < count:
            return []  # too few active latents to draw a set shaped like M
    out = []
    for _ in range(n_draws):
        drawn = []
        for layer, count in sorted(per_layer.items()):
            pool = pools[layer]
            pick = pool[torch.randperm(len(pool), generator=generator)[:count]]
            drawn += [Feature(layer, int(i)) for i in pick]
        out.append(drawn)
    return out


def seeded(seed: int, prompt_id: int) -> torch.Generator:
    """The draws' generator for one prompt of a run: distinct per prompt, fixed by seed."""
    return torch.Generator().manual_seed(seed * 100_003 + prompt_id)


def masks_for(sets: list[list[Feature]]) -> tuple[list[Feature], torch.Tensor]:
    """The features of all sets in first-seen order, and one mask row per set."""
    features = list(dict.fromkeys(f for s in sets for f in s))
    column = {f: i for i, f in enumerate(features)}
    masks = torch.zeros(len(sets), len(features))
    for row, s in enumerate(sets):
        masks[row, [column[f] for f in s]] = 1
    return features, masks


def run(ctx: Context, work: Work) -> RandomControlRecord:
    cfg, greedy = ctx.cfg.search.controls.random, work.result.greedy
    assert greedy is not None
    generator = seeded(ctx.cfg.seed, work.result.prompt_id)
    sets = draws(work.clean, greedy.minimal, cfg.n_draws, cfg.min_activation, generator)
    record = RandomControlRecord(prompt_id=work.result.prompt_id, n_draws=len(sets))
    if not sets:
        return record
    record.first_draw = sets[0]
    features, masks = masks_for(sets)
    scores = work.probe.score(features, masks)
    flipped = [s for s, score in zip(sets, scores.tolist()) if score < ctx.flip_threshold]
    judged = flipped[: cfg.judge_max]
    replies = ctx.replies([work.instruction] * len(judged), judged)
    verdicts = ctx.verdicts(work.instruction, replies) if replies else []
    return record.model_copy(
        update={
            "n_flipped": len(flipped),
            "n_judged": len(judged),
            "n_jailbroken_judged": sum(v == Verdict.COMPLIANCE for v in verdicts),
        }
    )


STAGE = Stage("random_control", ("greedy",), run, flipped)
