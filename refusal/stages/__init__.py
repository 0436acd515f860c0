"""The stages of a search, in the order they run; `stages:` in the config picks which.

baseline and direction run once per run (baseline over every evaluation prompt), before
the others, which run per refused prompt, each appending one row per prompt to
results.jsonl; controls runs once after them all (controls.json), then cards (cards.json).
A stage reads the rows of the stages it `needs`; leaving one of those out is an error
at start-up, before anything slow.
"""

from __future__ import annotations

from refusal.errors import ConfigError
from refusal.stages import (
    capability,
    dormant,
    greedy,
    interactions,
    random_control,
    verification,
)
from refusal.stages.stage import Stage

# name -> needs; baseline and direction run before the per-prompt stages, controls and
# cards after
RUN_STAGES = {
    "baseline": (),
    "direction": ("baseline",),
    "controls": ("greedy", "verification"),
    "cards": ("greedy", "verification"),
}
PROMPT_STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        greedy.STAGE,
        verification.STAGE,
        interactions.STAGE,
        dormant.STAGE,
        random_control.STAGE,
        capability.STAGE,
    )
}
ORDER = ["baseline", "direction", *PROMPT_STAGES, "controls", "cards"]


def needs(name: str) -> tuple[str, ...]:
    return RUN_STAGES[name] if name in RUN_STAGES else PROMPT_STAGES[name].needs


def check(names: list[str]) -> list[str]:
    """The configured stages in run order, each known and with what it needs."""
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        raise ConfigError(f"stages={names}: {unknown} unknown; the stages are {ORDER}.")
    for name in names:
        missing = [n for n in needs(name) if n not in names]
        if missing:
            raise ConfigError(
                f"stage {name} needs {missing}, which stages={names} leaves out: add "
                f"{missing} or drop {name}."
            )
    return [n for n in ORDER if n in names]
