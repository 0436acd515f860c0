"""Verification: generate with M ablated; the generation judge says whether it flipped."""

from __future__ import annotations

from refusal.context import Context, Work
from refusal.records import VerificationRecord
from refusal.stages.stage import Stage, flipped


def run(ctx: Context, work: Work) -> VerificationRecord:
    assert work.result.greedy is not None
    reply = ctx.reply(work.instruction, work.result.greedy.minimal)
    return VerificationRecord(
        prompt_id=work.result.prompt_id,
        reply_after=reply,
        flip_verified=not ctx.is_refusal(work.instruction, reply),
    )


STAGE = Stage("verification", ("greedy",), run, flipped)
