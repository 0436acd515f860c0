"""Dormant ("hydra") features: later-layer latents that wake when M is ablated.

A latent at SAE layer L is dormant for a prompt when it is silent on the clean prompt,
becomes active once the features of M at layers before L are ablated, and carries
refusal: ablating it as well moves the refusal score by more than a margin. This is
the redundancy that lets refusal survive the removal of its first carriers.
"""

from __future__ import annotations

import torch

from refusal.context import Context, Work
from refusal.features import Feature, Probe
from refusal.records import DormantFeature, DormantRecord
from refusal.stages.stage import Stage, flipped


def find(
    probe: Probe,
    minimal: list[Feature],
    layers: list[int],
    min_activation: float,
    max_candidates: int,
    margin: float,
    clean: dict[int, torch.Tensor] | None = None,
) -> list[DormantFeature]:
    """Dormant latents at each SAE layer after the first layer M touches; checked causally.

    `clean`: the prompt's latents without ablation, when the caller already has them.
    """
    clean = probe.latents() if clean is None else clean
    found = []
    for layer in sorted(layers):
        earlier = [f for f in minimal if f.layer < layer]
        if not earlier:
            continue
        woken = _woken(clean[layer], probe.latents(earlier)[layer], min_activation, max_candidates)
        if not woken:
            continue
        features = earlier + [Feature(layer, i) for i, _ in woken]
        masks = torch.zeros(len(woken) + 1, len(features))
        masks[:, : len(earlier)] = 1
        for row in range(len(woken)):
            masks[row + 1, len(earlier) + row] = 1
        scores = probe.score(features, masks).tolist()
        for row, (latent, after) in enumerate(woken):
            effect = scores[row + 1] - scores[0]
            if abs(effect) > margin:
                before = clean[layer][:, latent].max().item()
                found.append(
                    DormantFeature(
                        feature=Feature(layer, latent),
                        before=before,
                        after=after,
                        score_without=scores[0],
                        score_with=scores[row + 1],
                        effect=effect,
                    )
                )
    return found


def _woken(
    clean: torch.Tensor, ablated: torch.Tensor, min_activation: float, limit: int
) -> list[tuple[int, float]]:
    """Latents silent on the clean prompt and above min_activation once ablated, strongest first."""
    before, after = clean.max(0).values, ablated.max(0).values
    candidates = ((before <= 0) & (after > min_activation)).nonzero().flatten()
    strongest = after[candidates].argsort(descending=True)[:limit]
    return [(int(candidates[k]), after[candidates[k]].item()) for k in strongest]


def run(ctx: Context, work: Work) -> DormantRecord:
    cfg, greedy = ctx.cfg.search.dormant, work.result.greedy
    assert greedy is not None
    features = find(
        work.probe,
        greedy.minimal,
        list(ctx.engine.saes),
        cfg.min_activation,
        cfg.max_candidates,
        cfg.margin,
        work.clean,
    )
    return DormantRecord(prompt_id=work.result.prompt_id, features=features)


STAGE = Stage("dormant", ("greedy",), run, flipped)
