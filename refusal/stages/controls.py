"""Controls: the run-level stage after every prompt's search (refusal.controls).

Written once to controls.json (a ControlsRecord); a resumed run reads it back.
"""

from __future__ import annotations

import random
from typing import TypeVar

from refusal import controls
from refusal.context import Context
from refusal.records import ControlsRecord, EditCost, PromptResult

SAVED = "controls.json"
T = TypeVar("T")


def mean_cost(costs: list[EditCost]) -> EditCost | None:
    if not costs:
        return None
    n = len(costs)
    return EditCost(
        harmless_kl=sum(c.harmless_kl for c in costs) / n,
        delta_ce=sum(c.delta_ce for c in costs) / n,
        harmless_refusal_rate=sum(c.harmless_refusal_rate for c in costs) / n,
        n_prompts=costs[0].n_prompts,
        n_edits=n,
    )


def seeded_subset(items: list[T], n: int, seed: int) -> list[T]:
    """All of `items`, or a seeded sample of `n` of them in their order."""
    if len(items) <= n:
        return items
    chosen = set(random.Random(seed).sample(range(len(items)), n))
    return [x for i, x in enumerate(items) if i in chosen]


def run(ctx: Context, results: list[PromptResult]) -> ControlsRecord:
    path = ctx.out.path / SAVED
    if path.exists():  # only a resumed run finds one (RunDir.claim)
        return ControlsRecord.model_validate_json(path.read_text())
    # every prompt greedy found an M for (its score flips), jailbroken or not: a set that
    # moves the opening score is what random sets, other prompts and costs are set beside
    with_m = [r for r in results if r.score_minimal]
    searched = [r for r in results if r.searched]
    refused = [r for r in results if r.baseline.refused]
    # each cost generates on every capability prompt and each transfer source is scored on
    # every searched prompt: both take a seeded sample of search.controls.max_sets Ms
    # where more prompts have one (n_edits and the matrix's sources say which)
    sample = seeded_subset(with_m, ctx.cfg.search.controls.max_sets, ctx.cfg.seed)
    draws = [
        r.random_control.first_draw
        for r in sample
        if r.random_control and r.random_control.first_draw
    ]
    # the Ms' and their random draws' costs in one go: their replies generate together
    costs = controls.feature_costs(
        ctx, [r.score_minimal for r in sample] + draws, "Ms and random draws, harmless"
    )
    record = ControlsRecord(
        clean_harmless_refusal_rate=controls.clean_refusal_rate(ctx),
        transfer=controls.transfer(ctx, sample, searched) if sample else None,
        shared=controls.shared_set(ctx, with_m),
        direction=controls.direction_control(ctx, refused),
        minimal_cost=mean_cost(costs[: len(sample)]),
        random_cost=mean_cost(costs[len(sample) :]),
    )
    ctx.out.write_json(SAVED, record.to_json())
    return record
