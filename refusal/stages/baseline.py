"""Baseline: judge every evaluation prompt; only those the model refuses are searched."""

from __future__ import annotations

from tqdm import tqdm

from refusal.context import Context
from refusal.records import BaselineRecord


def judge(ctx: Context, prompt_id: int, instruction: str) -> BaselineRecord:
    score = ctx.engine.prepare(instruction).score
    reply = ctx.reply(instruction)
    return BaselineRecord(
        prompt_id=prompt_id,
        instruction=instruction,
        score=score,
        reply=reply,
        refused=ctx.refuses(instruction, score, reply),
    )


def run(ctx: Context, done: dict[int, BaselineRecord]) -> list[BaselineRecord]:
    """A record per evaluation prompt: those in `done` (resumed) kept, the others judged."""
    rows = []
    for i, instruction in enumerate(tqdm(ctx.prompts.eval, desc="baseline", unit="prompt")):
        rows.append(done[i] if i in done else ctx.record(judge(ctx, i, instruction)))
    return rows
