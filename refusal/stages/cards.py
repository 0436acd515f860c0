"""Feature cards: the run-level stage after controls (refusal.cards).

Written once to cards.json (a CardsRecord); a resumed run reads it back.
"""

from __future__ import annotations

from rich.console import Console

from refusal import cards
from refusal.context import Context
from refusal.records import ControlsRecord, PromptResult

console = Console(stderr=True)


def run(
    ctx: Context, results: list[PromptResult], checks: ControlsRecord | None
) -> cards.CardsRecord:
    path = ctx.out.path / cards.SAVED
    if path.exists():  # only a resumed run finds one (RunDir.claim)
        return cards.CardsRecord.model_validate_json(path.read_text())
    with console.status("feature cards: the corpus's top contexts of each finding's features"):
        record = cards.build(ctx, results, checks)
    ctx.out.write_json(cards.SAVED, record.to_json())
    return record
