"""Greedy filtering: prune the candidate features to a 1-minimal flipping set M.

Works on any probe that scores feature masks (the engine bound to one prompt, or a
synthetic oracle in tests). Each step scores all single removals as one batch; the
removable features are then dropped together, as many as still flip (one more
batch, of prefixes at geometric sizes). The final step's single removals all restore
refusal, so every returned set is verified 1-minimal, never assumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from refusal.engine import Feature


class Probe(Protocol):
    """Scores ablation masks over a feature list for one prompt (higher = more refusal)."""

    def score(self, features: list[Feature], masks: torch.Tensor) -> torch.Tensor: ...

    def latents(
        self, features: list[Feature] | None = None, mask: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]: ...


@dataclass
class GreedyResult:
    flips_all: bool  # ablating every candidate flips the prompt
    minimal: list[Feature] = field(default_factory=list)
    score: float | None = None  # refusal score with M ablated
    evals: int = 0  # masks scored
    batches: int = 0  # engine calls
    one_minimal: bool = False  # every single removal was checked to restore refusal


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
    result.one_minimal = True
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
