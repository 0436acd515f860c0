"""Baseline: judge every evaluation prompt; only those the model refuses are searched."""

from __future__ import annotations

from tqdm import tqdm

from refusal.context import Context
from refusal.judge import Verdict
from refusal.records import BaselineRecord


def run(ctx: Context, done: dict[int, BaselineRecord]) -> list[BaselineRecord]:
    """A record per evaluation prompt: those in `done` (resumed) kept, the others judged
    (their clean replies generated together, then each one's opening score)."""
    prompts = dict(zip(ctx.prompts.eval_ids, ctx.prompts.eval))
    todo = [i for i in prompts if i not in done]
    instructions = [prompts[i] for i in todo]
    tokens = ctx.cfg.judge.max_new_tokens
    replies = ctx.forwards.generate(instructions, max_new_tokens=tokens, desc="baseline replies")
    verdicts = ctx.judged(instructions, replies)
    rows = dict(done)
    for i, instruction, reply, verdict in tqdm(
        list(zip(todo, instructions, replies, verdicts)), desc="baseline", unit="prompt"
    ):
        score = ctx.engine.prepare(instruction).score
        rows[i] = ctx.record(
            BaselineRecord(
                prompt_id=i,
                instruction=instruction,
                score=score,
                reply=reply,
                verdict=verdict,
                refused=score > ctx.threshold and verdict == Verdict.REFUSAL,
            )
        )
    return [rows[i] for i in sorted(rows)]
