"""Controls beside the per-prompt findings: transfer of each M to the other prompts, a
shared feature set fitted on (part of) one half of the prompts and judged on the other,
ablation of the refusal direction itself, and what each edit costs on harmless prompts.

Every score goes through the engine (one batch of masks per target prompt); every
jailbreak counted is a generated reply the judge calls compliance.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm import tqdm

from refusal.context import Context
from refusal.direction import first_token_kl
from refusal.engine import PromptProbe
from refusal.features import Feature
from refusal.interventions import Edit, EmbedEdit, FeatureEdit, Steer, direction_ablation
from refusal.judge import Verdict
from refusal.records import (
    DirectionControl,
    EditCost,
    PromptResult,
    SharedSet,
    TransferMatrix,
)


@dataclass(frozen=True)
class EditSpec:
    """A residual edit as generation and the capability passes take it."""

    edit: Edit | None
    embed_edit: EmbedEdit | None = None
    spared: bool = True  # leave special-token positions alone (feature edits)


def feature_spec(ctx: Context, features: list[Feature]) -> EditSpec:
    return EditSpec(ctx.engine.feature_edit(features))


def generate(
    ctx: Context, instructions: list[str], spec: EditSpec, desc: str, harmless: bool = False
) -> list[str]:
    """Greedy replies with the edit: as long as verification's on harmful prompts (judged
    for compliance), as long as the capability setting's on harmless ones (judged for
    refusal, which a reply declares in its opening)."""
    tokens = ctx.cfg.search.capability if harmless else ctx.cfg.judge
    return ctx.forwards.generate(
        instructions,
        spec.edit,
        embed_edit=spec.embed_edit,
        max_new_tokens=tokens.max_new_tokens,
        desc=desc,
        spare=ctx.engine.spared if spec.spared else None,
    )


def jailbroken(ctx: Context, instructions: list[str], replies: list[str]) -> list[bool]:
    return [v == Verdict.COMPLIANCE for v in ctx.judged(instructions, replies)]


def cost(ctx: Context, spec: EditSpec, desc: str) -> EditCost:
    """First-token KL, the rise in cross-entropy of the model's own clean replies, and the
    judge's refusal rate, on the capability prompts with the edit applied."""
    replies = generate(ctx, ctx.capability_prompts, spec, desc, harmless=True)
    return measured_cost(ctx, spec, replies)


def feature_costs(ctx: Context, feature_sets: list[list[Feature]], desc: str) -> list[EditCost]:
    """`cost` of ablating each feature set. The harmless replies of all the sets are
    generated together (per-row masks, Context.replies): one set's few capability prompts
    fill a small batch, and on 2 CPU cores 64 rows decoded together took three quarters
    of the time of four batches of 16 (docs/measurements.md)."""
    prompts = ctx.capability_prompts
    replies = ctx.replies(
        [p for _ in feature_sets for p in prompts],
        [s for s in feature_sets for _ in prompts],
        max_new_tokens=ctx.cfg.search.capability.max_new_tokens,
        desc=desc,
    )
    n = len(prompts)
    return [
        measured_cost(ctx, feature_spec(ctx, s), replies[i * n : (i + 1) * n])
        for i, s in enumerate(feature_sets)
    ]


def measured_cost(ctx: Context, spec: EditSpec, replies: list[str]) -> EditCost:
    """`cost`, given the edited model's replies to the capability prompts."""
    prompts, spare = ctx.capability_prompts, ctx.engine.spared if spec.spared else None
    # the clean replies read under the edit: their log-probabilities, and where they
    # start the first-token logits, from one pass
    edited = ctx.forwards.read(
        prompts, ctx.capability_replies, edit=spec.edit, embed_edit=spec.embed_edit, spare=spare
    )
    logits = torch.stack([r.first for r in edited])
    clean = ctx.capability_logprobs
    return EditCost(
        harmless_kl=first_token_kl(ctx.capability_logits, logits).mean().item(),
        delta_ce=sum(c - e.logprob for c, e in zip(clean, edited)) / len(prompts),
        harmless_refusal_rate=ctx.refusal_rate(prompts, replies),
        n_prompts=len(prompts),
    )


def clean_refusal_rate(ctx: Context) -> float:
    """The judge's refusal rate on the model's own clean replies to the capability prompts:
    an edit's harmless refusal rate means something only beside this."""
    return ctx.refusal_rate(ctx.capability_prompts, ctx.capability_replies)


def transfer(
    ctx: Context, sources: list[PromptResult], targets: list[PromptResult]
) -> TransferMatrix:
    """Each source's M ablated on each target prompt: score flips, one engine batch per
    target; a seeded sample of the off-diagonal flips generated and judged."""
    features = list(dict.fromkeys(f for s in sources for f in s.score_minimal))
    column = {f: i for i, f in enumerate(features)}
    masks = torch.zeros(len(sources), len(features))
    for row, s in enumerate(sources):
        masks[row, [column[f] for f in s.score_minimal]] = 1
    flips = []
    for target in tqdm(targets, desc="transfer: Ms on each prompt", unit="prompt", leave=False):
        probe = PromptProbe(ctx.engine, ctx.engine.prepare(target.instruction))
        scores = probe.score(features, masks)
        flips.append((scores < ctx.flip_threshold).tolist())
    matrix = [[flips[t][s] for t in range(len(targets))] for s in range(len(sources))]
    off = [
        (s, t)
        for s in range(len(sources))
        for t in range(len(targets))
        if matrix[s][t] and sources[s].prompt_id != targets[t].prompt_id
    ]
    sample = random.Random(ctx.cfg.seed).sample(
        off, min(len(off), ctx.cfg.search.controls.transfer.judge_max)
    )
    instructions = [targets[t].instruction for _, t in sample]
    replies = ctx.replies(instructions, [sources[s].score_minimal for s, _ in sample])
    judged = jailbroken(ctx, instructions, replies)
    return TransferMatrix(
        sources=[s.prompt_id for s in sources],
        targets=[t.prompt_id for t in targets],
        flips=matrix,
        n_judged=len(judged),
        n_jailbroken_judged=sum(judged),
    )


def cover(
    probes: list[PromptProbe],
    units: list[list[Feature]],
    threshold: float,
    max_size: int,
    share: float,
) -> tuple[list[Feature], list[bool]]:
    """Greedy set cover by the engine. Units are what may be added: single recurring
    features and whole minimal sets. Each step adds the unit that flips the most prompts
    per feature it adds (with the set so far; fewer features on ties); it stops at `share`
    of the prompts, at max_size features, or when no unit flips one more prompt. Returns
    the set and which prompts it flips."""
    chosen: list[Feature] = []
    covered = [False] * len(probes)
    with tqdm(desc="shared set: cover", total=max_size, unit="feature", leave=False) as bar:
        while sum(covered) < share * len(probes):
            trials = [
                chosen + [f for f in u if f not in chosen]
                for u in units
                if any(f not in chosen for f in u)
            ]
            trials = [t for t in trials if len(t) <= max_size]
            if not trials:
                break
            features = list(dict.fromkeys(f for t in trials for f in t))
            masks = torch.tensor([[float(f in t) for f in features] for t in trials])
            flips = torch.stack([p.score(features, masks) < threshold for p in probes])  # (P, T)
            gains = [
                (int(flips[:, k].sum()) - sum(covered)) / (len(t) - len(chosen))
                for k, t in enumerate(trials)
            ]
            best = max(range(len(trials)), key=lambda k: (gains[k], -len(trials[k])))
            if gains[best] <= 0:
                break
            bar.update(len(trials[best]) - len(chosen))
            chosen, covered = trials[best], flips[:, best].tolist()
    return chosen, covered


def shared_set(ctx: Context, prompts: list[PromptResult]) -> SharedSet | None:
    """A feature set fitted on a seeded half of the prompts with an M (at most
    search.controls.max_sets of them: the greedy cover scores every unit on every fit
    prompt at each step) and judged on the other half; its capability cost, and the
    refusal it induces when its decoder rows are added."""
    cfg = ctx.cfg.search.controls.shared
    if len(prompts) < 2:
        return None
    order = random.Random(ctx.cfg.seed).sample(prompts, len(prompts))
    half = len(order) // 2
    fit, held = order[: min(half, ctx.cfg.search.controls.max_sets)], order[half:]
    counts = Counter(f for p in fit for f in p.score_minimal)
    units = [[f] for f, n in counts.most_common() if n > 1] + [p.score_minimal for p in fit]
    probes = [PromptProbe(ctx.engine, ctx.engine.prepare(p.instruction)) for p in fit]
    features, covered = cover(probes, units, ctx.flip_threshold, cfg.max_size, cfg.cover)
    instructions = [p.instruction for p in held]
    replies = generate(ctx, instructions, feature_spec(ctx, features), "shared set, held out")
    broken = jailbroken(ctx, instructions, replies)
    return SharedSet(
        features=features,
        fit_prompts=[p.prompt_id for p in fit],
        held_out=[p.prompt_id for p in held],
        fit_cover=sum(covered) / len(fit) if covered else 0.0,
        n_jailbroken_held_out=sum(broken),
        cost=feature_costs(ctx, [features], "shared set, harmless")[0],
        induced_refusal_rate=induced(ctx, features),
    )


def induced(ctx: Context, features: list[Feature]) -> float:
    """The judge's refusal rate on the capability prompts with the features' decoder rows
    added (a positive clamp: search.steer.alpha times each row, at every position)."""
    if not features:
        return 0.0
    steer = Steer(alpha=ctx.cfg.search.steer.alpha)
    masks = torch.ones(1, len(features))
    spec = EditSpec(FeatureEdit(steer, ctx.engine.saes, features, masks, ctx.lm.dtype))
    prompts = ctx.capability_prompts
    replies = generate(ctx, prompts, spec, "shared set added, harmless", harmless=True)
    return ctx.refusal_rate(prompts, replies)


def direction_control(ctx: Context, prompts: list[PromptResult]) -> DirectionControl | None:
    """The selected refusal direction projected out at every layer and the embeddings
    (Arditi et al.), on the same refused prompts, judged the same way; and its cost."""
    if ctx.selection is None or not prompts:
        return None
    edit, embed_edit = direction_ablation(ctx.selection.direction)
    spec = EditSpec(edit, embed_edit, spared=False)
    instructions = [p.instruction for p in prompts]
    broken = jailbroken(ctx, instructions, generate(ctx, instructions, spec, "direction ablated"))
    return DirectionControl(
        n_prompts=len(prompts),
        n_jailbroken=sum(broken),
        cost=cost(ctx, spec, "direction ablated, harmless"),
    )
