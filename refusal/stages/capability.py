"""Capability cost: mean first-token KL on harmless val prompts with M ablated."""

from __future__ import annotations

from refusal.context import Context, Work
from refusal.direction import first_token_kl
from refusal.records import CapabilityRecord
from refusal.stages.stage import Stage, flipped


def harmless_kl(ctx: Context, work: Work) -> float:
    assert work.result.greedy is not None
    edit = ctx.engine.feature_edit(work.result.greedy.minimal)
    ablated = ctx.forwards.first_token_logits(ctx.capability_prompts, edit, spare=ctx.engine.spared)
    return first_token_kl(ctx.capability_logits, ablated).mean().item()


def run(ctx: Context, work: Work) -> CapabilityRecord:
    return CapabilityRecord(prompt_id=work.result.prompt_id, harmless_kl=harmless_kl(ctx, work))


STAGE = Stage("capability", ("greedy",), run, flipped)
