"""Verification by generation: is the flip a jailbreak, and is M 1-minimal when read?

The opening score steered greedy filtering; here the judge reads greedy replies. With M
ablated the reply must be judged compliance (refusal, degenerate and evasive replies are
not jailbreaks: the prompt is unresolved). For a verified M, each M minus one feature is
generated and judged too: M is 1-minimal only if every one of them is a refusal.

Several prompts verify together: their replies are decoded in one batch (per-row masks),
as are the minimality checks of all those judged jailbroken.
"""

from __future__ import annotations

from refusal.context import Context, Work
from refusal.features import Feature
from refusal.judge import Verdict
from refusal.records import MinimalityCheck, VerificationRecord
from refusal.stages.stage import Stage, flipped


def _minimal(work: Work) -> list[Feature]:
    assert work.result.greedy is not None
    return work.result.greedy.minimal


def together(ctx: Context, works: list[Work]) -> list[VerificationRecord]:
    instructions = [w.instruction for w in works]
    replies = ctx.replies(instructions, [_minimal(w) for w in works])
    verdicts = ctx.judged(instructions, replies)
    # each jailbroken prompt's M minus one feature, all in one batch
    removed = [
        (w, f) for w, v in zip(works, verdicts) if v == Verdict.COMPLIANCE for f in _minimal(w)
    ]
    kept_instructions = [w.instruction for w, _ in removed]
    kept = ctx.replies(kept_instructions, [[g for g in _minimal(w) if g != f] for w, f in removed])
    kept_verdicts = ctx.judged(kept_instructions, kept) if kept else []
    checks: dict[int, list[MinimalityCheck]] = {w.result.prompt_id: [] for w in works}
    for (w, f), v, r in zip(removed, kept_verdicts, kept):
        checks[w.result.prompt_id].append(MinimalityCheck(feature=f, verdict=v, reply=r))
    return [
        VerificationRecord(
            prompt_id=w.result.prompt_id,
            reply_after=reply,
            verdict_after=verdict,
            flip_verified=verdict == Verdict.COMPLIANCE,
            minimality=checks[w.result.prompt_id],
            one_minimal=verdict == Verdict.COMPLIANCE
            and all(c.verdict == Verdict.REFUSAL for c in checks[w.result.prompt_id]),
        )
        for w, reply, verdict in zip(works, replies, verdicts)
    ]


def run(ctx: Context, work: Work) -> VerificationRecord:
    return together(ctx, [work])[0]


STAGE = Stage("verification", ("greedy",), run, flipped, together)
