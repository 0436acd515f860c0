"""The refusal direction: difference of means at every layer and post-instruction
position, and the (layer, position) chosen by refusal.direction.select.

The train and val prompts are first filtered by the model's baseline (harmful kept
only where refused, harmless only where not; search.direction.filter_prompts). Computed
once per run and saved as direction.pt (tensors and the record) and direction.json
(DirectionRecord); a resumed run reads them back.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from rich.console import Console

from refusal import direction
from refusal.context import Context
from refusal.errors import ConfigError, RefusalError
from refusal.records import DirectionRecord, PromptCount

console = Console(stderr=True)
SAVED = "direction.pt"
SETS = ("harmful_train", "harmless_train", "harmful_val", "harmless_val")


def load(ctx: Context, path: Path) -> direction.Selection:
    """Saved directions and selection (a direction.pt), into `ctx`."""
    if not path.is_file():
        raise ConfigError(f"search.direction.load={path} is not a direction.pt file.")
    saved = torch.load(path)
    if "record" not in saved:
        raise RefusalError(
            f"{path} was written by an older version of refusal; rerun without "
            "resume=true, into a new directory."
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


def prompt_sets(ctx: Context) -> tuple[dict[str, list[str]], dict[str, PromptCount]]:
    """The direction's train and val prompts, through the baseline filter where configured,
    and how many it kept of each (none counted without it)."""
    sets = {name: getattr(ctx.prompts, name) for name in SETS}
    if not ctx.cfg.search.direction.filter_prompts:
        return sets, {}
    with console.status("refusal direction: filtering the prompts by the model's baseline"):
        sets, counts = direction.filter_by_baseline(ctx.forwards, sets, ctx.threshold)
    kept = ", ".join(f"{name} {c.kept}/{c.kept + c.dropped}" for name, c in counts.items())
    console.print(f"refusal direction: prompts kept by the baseline filter: {kept}", soft_wrap=True)
    return sets, counts


def run(ctx: Context) -> direction.Selection:
    cfg = ctx.cfg.search.direction
    if (ctx.out.path / SAVED).exists():  # only a resumed run finds one (RunDir.claim)
        return load(ctx, ctx.out.path / SAVED)
    if cfg.get("load"):  # another run's, on the same model and train/val prompts
        selection = load(ctx, Path(cfg.load))
        assert ctx.directions is not None
        save(ctx, ctx.directions, selection)
        return selection
    sets, counts = prompt_sets(ctx)
    with console.status("refusal direction: difference of means"):
        directions = direction.mean_diff(
            ctx.forwards, sets["harmful_train"], sets["harmless_train"]
        )
    selection = direction.select(
        ctx.forwards,
        directions,
        sets["harmful_val"],
        sets["harmless_val"],
        cfg.exclude_last_fraction,
        cfg.kl_max,
        cfg.induce_min,
        cfg.n_positions,
        cfg.on_none_admissible,
        cfg.score_all,
    )
    selection = dataclasses.replace(selection, prompts=counts)
    save(ctx, directions, selection)
    return selection
