"""Greedy filtering: prune the candidate features to a 1-minimal flipping set M.

Candidates are the SAE latents whose decoder rows align with the selected refusal
direction, at every SAE layer (refusal.direction.candidates), active on the prompt. It
works on any probe that scores feature masks (the engine bound to one prompt, or a
synthetic oracle in tests). Each step scores all single removals as one batch; the
removable features are then dropped together, as many as still flip (one more batch, of
prefixes at geometric sizes). The final step's single removals all restore refusal, so
every returned set is 1-minimal by the score, never assumed; verification then checks
each single removal by generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from refusal import direction
from refusal.context import Context, Work
from refusal.features import Feature, Probe
from refusal.records import Candidate, GreedyRecord
from refusal.stages.stage import Stage


@dataclass
class GreedyResult:
    flips_all: bool  # ablating every candidate flips the prompt
    minimal: list[Feature] = field(default_factory=list)
    score: float | None = None  # refusal score with M ablated
    evals: int = 0  # masks scored
    batches: int = 0  # engine calls
    one_minimal_by_score: bool = False  # every single removal restores the opening score


def _without(n: int, removed: list[list[int]]) -> torch.Tensor:
    masks = torch.ones(len(removed), n)
    for row, idx in enumerate(removed):
        masks[row, idx] = 0
    return masks


def minimal_set(probe: Probe, features: list[Feature], threshold: float) -> GreedyResult:
    """A 1-minimal subset of `features` whose ablation keeps the score below `threshold`."""
    result = GreedyResult(flips_all=False)
    n = len(features)

    def scores(removed: list[list[int]]) -> list[float]:
        result.evals += len(removed)
        result.batches += 1
        return probe.score(features, _without(n, removed)).tolist()

    kept = list(range(n))
    result.score = scores([[]])[0]
    if not result.score < threshold:
        return result
    result.flips_all = True
    while kept:  # (kept empties only if the prompt was never refused)
        gone = _removed(n, kept)
        single = scores([[*gone, i] for i in kept])
        removable = sorted((s, i) for s, i in zip(single, kept) if s < threshold)
        if not removable:  # every single removal restores refusal: verified 1-minimal
            break
        order = [i for _, i in removable]
        drop, result.score = order[:1], removable[0][0]
        if len(order) > 1:  # drop the least needed features together, as many as still flip
            sizes = prefix_sizes(len(order))
            prefix = scores([[*gone, *order[:size]] for size in sizes])
            flipping = [(size, s) for size, s in zip(sizes, prefix) if s < threshold]
            if flipping:
                size, result.score = flipping[-1]
                drop = order[:size]
        kept = [i for i in kept if i not in drop]
    result.minimal = [features[i] for i in kept]
    result.one_minimal_by_score = bool(kept)  # the loop ended on a step with nothing removable
    return result


def prefix_sizes(n: int) -> list[int]:
    """Prefix sizes 2..n to try dropping together: dense at both ends, geometric between.

    The largest flipping prefix is what matters, and it usually lies near n (all but a few
    removable features) or near 2; about 2·log2(n) masks stand in for n - 1, and features
    a coarse step leaves behind go in the next step's single removals.
    """
    steps = [2**k for k in range(n.bit_length())]
    return sorted({s for s in [*steps, n] if s >= 2} | {n - s for s in steps if n - s >= 2})


def _removed(n: int, kept: list[int]) -> list[int]:
    keep = set(kept)
    return [i for i in range(n) if i not in keep]


def sequential_minimal_set(probe: Probe, features: list[Feature], threshold: float) -> GreedyResult:
    """The one-at-a-time reference: try dropping each feature in turn, one mask per call."""
    result = GreedyResult(flips_all=False)
    kept = list(range(len(features)))

    def score(removed: list[int]) -> float:
        result.evals += 1
        result.batches += 1
        return probe.score(features, _without(len(features), [removed]))[0].item()

    result.score = score([])
    if not result.score < threshold:
        return result
    result.flips_all = True
    for i in range(len(features)):
        trial = [j for j in kept if j != i]
        if score(_removed(len(features), trial)) < threshold:
            kept = trial
    result.minimal = [features[i] for i in kept]
    result.score = score(_removed(len(features), kept))
    return result


def candidates(ctx: Context, work: Work) -> list[Candidate]:
    """The prompt's candidates: latents aligned with the refusal direction (the selected
    one, or each layer's own: search.candidates.direction), active on it."""
    assert ctx.directions is not None and ctx.selection is not None
    c = ctx.cfg.search.candidates
    saes = ctx.engine.saes
    targets = direction.candidate_directions(
        ctx.lm, ctx.selection, ctx.directions, saes, c.direction
    )
    found = direction.candidates(saes, targets, work.clean, c.top_k, c.cos_floor, c.min_activation)
    return [Candidate(feature=f, cos=cos) for f, cos in found]


def run(ctx: Context, work: Work) -> GreedyRecord:
    found = candidates(ctx, work)
    record = GreedyRecord(
        prompt_id=work.result.prompt_id, clean_score=work.probe.cache.score, candidates=found
    )
    if not found:
        return record
    result = minimal_set(work.probe, [c.feature for c in found], ctx.flip_threshold)
    return record.model_copy(
        update={
            "flips_all": result.flips_all,
            "minimal": result.minimal,
            "score": result.score,
            "n_masks": result.evals,
            "batches": result.batches,
            "one_minimal_by_score": result.one_minimal_by_score,
        }
    )


STAGE = Stage("greedy", ("direction",), run)
