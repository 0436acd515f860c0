"""Dormant ("hydra") features: later-layer latents that wake when parts of M are ablated
and then hold refusal up.

For each *setting* S — the features of M before a layer L, and each M minus one feature
(a partial M, on which the model still refuses because something took over) — a latent
at SAE layer L is a candidate when it is silent on the clean prompt and active under S.
It is dormant when ablating it as well *lowers* the refusal score by more than the
margin, and by more than the 95th percentile of a null: latents at the same layer, active
under S at matched activation, ablated the same way. A latent that raises the score when
ablated is recorded with its sign but never counted. Where ablating it changes what the
opening score predicts (refusal under S, compliance with it), a generated reply is
judged to confirm the effect.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from refusal.context import Context, Work
from refusal.features import Feature, Probe
from refusal.records import DormantFeature, DormantRecord
from refusal.stages.stage import Stage, jailbroken


@dataclass(frozen=True)
class Settings:
    min_activation: float  # awake: activation above this
    max_candidates: int  # woken latents checked per (setting, layer)
    margin: float  # score drop that counts
    null_size: int  # matched latents in the null per (setting, layer)
    null_percentile: float  # the drop must exceed this percentile of the null's

    @classmethod
    def of(cls, cfg: DictConfig) -> Settings:
        """From `search.dormant`."""
        return cls(
            cfg.min_activation, cfg.max_candidates, cfg.margin, cfg.null_size, cfg.null_percentile
        )


def settings_of(minimal: list[Feature]) -> list[list[Feature]]:
    """Parts of M to ablate: every M minus one feature (one only: M of size 1 has no
    partial), and M's features before each layer M touches."""
    partial = [[g for g in minimal if g != f] for f in minimal] if len(minimal) > 1 else []
    layers = sorted({f.layer for f in minimal})
    earlier = [[f for f in minimal if f.layer < layer] for layer in layers[1:]]
    unique: dict[frozenset[Feature], list[Feature]] = {}
    for s in [*earlier, *partial]:
        unique.setdefault(frozenset(s), s)
    return [s for s in unique.values() if s]


def find(
    probe: Probe,
    minimal: list[Feature],
    layers: list[int],
    settings: Settings,
    clean: dict[int, torch.Tensor] | None = None,
) -> list[DormantFeature]:
    """Dormant latents, strongest drop first, one entry per latent (its largest drop).

    `clean`: the prompt's latents without ablation, when the caller already has them.
    """
    clean = probe.latents() if clean is None else clean
    best: dict[Feature, DormantFeature] = {}
    for setting in settings_of(minimal):
        ablated = probe.latents(setting)
        first = min(f.layer for f in setting)
        for layer in sorted(x for x in layers if x > first):
            for found in _at_layer(probe, setting, layer, clean[layer], ablated[layer], settings):
                known = best.get(found.feature)
                if known is None or found.effect < known.effect:
                    best[found.feature] = found
    return sorted(best.values(), key=lambda d: d.effect)


def _at_layer(
    probe: Probe,
    setting: list[Feature],
    layer: int,
    clean: torch.Tensor,
    ablated: torch.Tensor,
    settings: Settings,
) -> list[DormantFeature]:
    """The woken latents at one layer under one setting, each scored against the null.

    The null is scored only where a woken latent lowers refusal by the margin: it can only
    reject such latents, never admit one, so elsewhere it would change nothing."""
    before, after = clean.max(0).values, ablated.max(0).values
    woken = _strongest(
        (before <= 0) & (after > settings.min_activation), after, settings.max_candidates
    )
    if not woken:
        return []
    base, *scores = _scores(probe, setting, layer, [None, *woken])
    drops = [base - s for s in scores]
    if max(drops) <= settings.margin:
        return []
    pool = (before > 0) & (after > settings.min_activation)
    pool[[f.latent for f in setting if f.layer == layer]] = False  # already ablated
    null = _matched(after, pool, woken, settings.null_size)
    null_drops = torch.tensor([base - s for s in _scores(probe, setting, layer, null)])
    found = []
    for latent, drop in zip(woken, drops):
        percentile = 100.0 * (null_drops < drop).float().mean().item() if len(null) else 100.0
        if drop <= settings.margin or percentile < settings.null_percentile:
            continue  # raises refusal, or lowers it no more than the null's latents do
        found.append(
            DormantFeature(
                feature=Feature(layer, latent),
                setting=setting,
                before=before[latent].item(),
                after=after[latent].item(),
                score_without=base,
                score_with=base - drop,
                effect=-drop,
                null_percentile=percentile,
                null_size=len(null),
            )
        )
    return found


def _scores(
    probe: Probe, setting: list[Feature], layer: int, latents: Sequence[int | None]
) -> list[float]:
    """The opening score with `setting` ablated and, row by row, each of `latents` at
    `layer` as well (None: the setting alone), in one batch."""
    if not latents:
        return []
    extra = [i for i in latents if i is not None]
    features = setting + [Feature(layer, i) for i in extra]
    masks = torch.zeros(len(latents), len(features))
    masks[:, : len(setting)] = 1
    for row, i in enumerate(latents):
        if i is not None:
            masks[row, len(setting) + extra.index(i)] = 1
    return probe.score(features, masks).tolist()


def _strongest(where: torch.Tensor, acts: torch.Tensor, limit: int) -> list[int]:
    idx = where.nonzero().flatten()
    return [int(idx[k]) for k in acts[idx].argsort(descending=True)[:limit]]


def _matched(acts: torch.Tensor, pool: torch.Tensor, targets: list[int], size: int) -> list[int]:
    """Up to `size` latents of `pool` whose activations are nearest the targets', taken in
    turn so that each target gets its nearest ones."""
    idx = pool.nonzero().flatten().tolist()
    chosen: list[int] = []
    ranked = [(acts[idx] - acts[t]).abs().argsort().tolist() for t in targets]
    ranked = [[idx[k] for k in order] for order in ranked]
    for k in range(len(idx)):
        for order in ranked:
            if len(chosen) == size:
                return chosen
            if order[k] not in chosen:
                chosen.append(order[k])
    return chosen


def confirm(ctx: Context, work: Work, found: list[DormantFeature]) -> list[DormantFeature]:
    """The judge on a generated reply, where the dormant latent moves the opening score
    across the threshold (refusal under its setting, not with it ablated as well); the
    replies generated together."""
    crossing = [k for k, d in enumerate(found) if d.score_without > ctx.threshold >= d.score_with]
    sets = [[*found[k].setting, found[k].feature] for k in crossing]
    replies = ctx.replies([work.instruction] * len(sets), sets)
    verdicts = dict(zip(crossing, ctx.verdicts(work.instruction, replies)))
    return [
        d.model_copy(update={"verdict_with": verdicts[k]}) if k in verdicts else d
        for k, d in enumerate(found)
    ]


def run(ctx: Context, work: Work) -> DormantRecord:
    cfg, greedy = ctx.cfg.search.dormant, work.result.greedy
    assert greedy is not None
    found = find(work.probe, greedy.minimal, list(ctx.engine.saes), Settings.of(cfg), work.clean)
    return DormantRecord(prompt_id=work.result.prompt_id, features=confirm(ctx, work, found))


STAGE = Stage("dormant", ("greedy", "verification"), run, jailbroken)
