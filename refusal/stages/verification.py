"""Verification by generation: is the flip a jailbreak, and is M 1-minimal when read?

The opening score steered greedy filtering; here the judge reads greedy replies. With M
ablated the reply must be judged compliance (refusal, degenerate and evasive replies are
not jailbreaks: the prompt is unresolved). For a verified M, each M minus one feature is
generated and judged too: M is 1-minimal only if every one of them is a refusal.
"""

from __future__ import annotations

from refusal.context import Context, Work
from refusal.judge import Verdict
from refusal.records import MinimalityCheck, VerificationRecord
from refusal.stages.stage import Stage, flipped


def run(ctx: Context, work: Work) -> VerificationRecord:
    assert work.result.greedy is not None
    minimal = work.result.greedy.minimal
    reply = ctx.reply(work.instruction, minimal)
    verdict = ctx.verdicts(work.instruction, [reply])[0]
    checks: list[MinimalityCheck] = []
    if verdict == Verdict.COMPLIANCE:  # each M minus one feature, in one batch
        sets = [[g for g in minimal if g != f] for f in minimal]
        kept = ctx.replies([work.instruction] * len(sets), sets)
        verdicts = ctx.verdicts(work.instruction, kept)
        checks = [
            MinimalityCheck(feature=f, verdict=v, reply=r)
            for f, v, r in zip(minimal, verdicts, kept)
        ]
    return VerificationRecord(
        prompt_id=work.result.prompt_id,
        reply_after=reply,
        verdict_after=verdict,
        flip_verified=verdict == Verdict.COMPLIANCE,
        minimality=checks,
        one_minimal=verdict == Verdict.COMPLIANCE
        and all(c.verdict == Verdict.REFUSAL for c in checks),
    )


STAGE = Stage("verification", ("greedy",), run, flipped)
