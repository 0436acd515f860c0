"""The refusal direction: difference of means at every layer and post-instruction
position, and the (layer, position) chosen by refusal.direction.select.

Computed once per run and saved as direction.pt (tensors) and direction.json
(DirectionRecord); a resumed run reads them back.
"""

from __future__ import annotations

import torch
from rich.console import Console

from refusal import direction
from refusal.context import Context
from refusal.records import DirectionScore

console = Console(stderr=True)
SAVED = "direction.pt"


def run(ctx: Context) -> direction.Selection:
    path = ctx.out.path / SAVED
    if path.exists():
        saved = torch.load(path)
        selection = saved["selection"]
        selection["scores"] = [DirectionScore(**s) for s in selection["scores"]]
        ctx.directions, ctx.selection = saved["directions"], direction.Selection(**selection)
        return ctx.selection
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
    )
    saved = {
        "directions": directions,
        "selection": {
            "layer": selection.layer,
            "position": selection.position,
            "direction": selection.direction,
            "scores": [s.model_dump() for s in selection.scores],
        },
    }
    ctx.out.write_atomic(path.name, lambda f: torch.save(saved, f))
    ctx.out.write_json("direction.json", selection.record().to_json())
    ctx.directions, ctx.selection = directions, selection
    return selection
