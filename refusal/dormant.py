"""Dormant ("hydra") features: later-layer latents that wake when M is ablated.

A latent at SAE layer L is dormant for a prompt when it is silent on the clean prompt,
becomes active once the features of M at layers before L are ablated, and carries
refusal: ablating it as well moves the refusal score by more than a margin. This is
the redundancy that lets refusal survive the removal of its first carriers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from refusal.engine import Feature
from refusal.greedy import Probe


@dataclass
class Dormant:
    feature: str
    layer: int
    latent: int
    before: float  # max activation on the clean prompt
    after: float  # max activation with the earlier features of M ablated
    score_without: float  # refusal score, earlier M ablated
    score_with: float  # refusal score, earlier M and this latent ablated
    effect: float  # score_with − score_without (negative: it was holding refusal up)

    def to_dict(self) -> dict:
        return asdict(self)


def find(
    probe: Probe,
    minimal: list[Feature],
    layers: list[int],
    min_activation: float,
    max_candidates: int,
    margin: float,
    clean: dict[int, torch.Tensor] | None = None,
) -> list[Dormant]:
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
                    Dormant(
                        str(Feature(layer, latent)),
                        layer,
                        latent,
                        before,
                        after,
                        scores[0],
                        scores[row + 1],
                        effect,
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
