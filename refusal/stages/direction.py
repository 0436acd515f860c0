"""The refusal direction: difference of means at every layer and post-instruction
position, and the (layer, position) chosen by refusal.direction.select.

Computed once per run and saved as direction.pt (tensors and the record) and
direction.json (DirectionRecord); a resumed run reads them back.
"""

from __future__ import annotations

import torch
from rich.console import Console

from refusal import direction
from refusal.context import Context
from refusal.errors import RefusalError
from refusal.records import DirectionRecord

console = Console(stderr=True)
SAVED = "direction.pt"


def load(ctx: Context) -> direction.Selection:
    """The saved directions and selection, into `ctx`."""
    saved = torch.load(ctx.out.path / SAVED)
    if "record" not in saved:
        raise RefusalError(
            f"{ctx.out.path / SAVED} was written by an older version of refusal; rerun "
            "without resume=true, into a new directory."
        )
    ctx.directions = saved["directions"]
    record = DirectionRecord.model_validate(saved["record"])
    ctx.selection = direction.Selection.of(record, saved["direction"])
    return ctx.selection


def save(ctx: Context, directions: torch.Tensor, selection: direction.Selection) -> None:
    """direction.pt and direction.json, and the directions and selection into `ctx`."""
    record = selection.record().to_json()
    saved = {"directions": directions, "direction": selection.direction, "record": record}
    ctx.out.write_atomic(SAVED, lambda f: torch.save(saved, f))
    ctx.out.write_json("direction.json", record)
    ctx.directions, ctx.selection = directions, selection


def run(ctx: Context) -> direction.Selection:
    if (ctx.out.path / SAVED).exists():
        return load(ctx)
    cfg, p = ctx.cfg.search.direction, ctx.prompts
    with console.status("refusal direction: difference of means"):
        directions = direction.mean_diff(ctx.forwards, p.harmful_train, p.harmless_train)
    selection = direction.select(
        ctx.forwards,
        directions,
        p.harmful_val,
        p.harmless_val,
        cfg.exclude_last_fraction,
        cfg.kl_max,
        cfg.induce_min,
        cfg.n_positions,
        cfg.on_none_admissible,
    )
    save(ctx, directions, selection)
    return selection
