"""The refusal direction (difference of means), its selection, and candidate SAE features.

r[layer, pos] = mean(h | harmful) − mean(h | harmless) at the post-instruction token
positions (the chat-template tokens between the instruction and the reply). The
(position, layer) is chosen as in Arditi et al. 2024: ablating r everywhere should
stop refusal on harmful prompts (bypass score, lower is better), adding r at its layer
should induce refusal on harmless prompts (induce score), and ablating r should barely
change harmless first-token distributions (KL); the last 20% of layers are excluded.

The candidate SAE features are the latents whose decoder rows lie nearest the selected
direction, at every SAE layer (or, per_layer, each layer's own difference of means).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from sae_lens import SAE
from tqdm import tqdm

from refusal.features import Feature
from refusal.forwards import Forwards
from refusal.interventions import direction_ablation, direction_addition
from refusal.models import LM
from refusal.records import DirectionRecord, DirectionScore


def post_instruction_positions(lm: LM) -> list[int]:
    """Negative offsets of the template tokens that follow the user's instruction."""
    marker = "XQZX"
    ids = lm.tokenizer(lm.format([marker])[0], add_special_tokens=False)["input_ids"]
    marker_ids = lm.tokenizer(marker, add_special_tokens=False)["input_ids"]
    for end in range(len(ids), 0, -1):
        if ids[end - len(marker_ids) : end] == marker_ids:
            return list(range(end - len(ids), 0))
    raise ValueError("the chat template does not contain the instruction verbatim")


def mean_diff(forwards: Forwards, harmful: list[str], harmless: list[str]) -> torch.Tensor:
    """Difference-of-means directions, shape (n_layers, n_positions, d_model)."""
    positions = post_instruction_positions(forwards.lm)
    means = forwards.residual_means
    return means(harmful, positions) - means(harmless, positions)


def first_token_kl(clean_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ edited) of next-token distributions, per prompt."""
    clean, edited = clean_logits.float().log_softmax(-1), logits.float().log_softmax(-1)
    return (clean.exp() * (clean - edited)).sum(-1)


@dataclass
class Selection:
    layer: int
    position: int  # negative offset from the end of the prompt
    direction: torch.Tensor  # (d_model,), unnormalised difference of means
    scores: list[DirectionScore]  # every candidate's bypass / induce / KL

    def record(self) -> DirectionRecord:
        return DirectionRecord(layer=self.layer, position=self.position, scores=self.scores)


def select(
    forwards: Forwards,
    directions: torch.Tensor,
    harmful_val: list[str],
    harmless_val: list[str],
    exclude_last_fraction: float = 0.2,
    kl_max: float = 0.1,
    induce_min: float = 0.0,
    n_positions: int | None = None,
) -> Selection:
    """Choose (position, layer) by bypass score among candidates passing the KL and induce filters.

    n_positions limits the search to the last n post-instruction positions (None: all).
    """
    n_layers, all_positions, _ = directions.shape
    positions = post_instruction_positions(forwards.lm)
    first = all_positions - min(n_positions or all_positions, all_positions)
    clean_harmless = forwards.first_token_logits(harmless_val)
    scores = []
    max_layer = int(n_layers * (1 - exclude_last_fraction))
    grid = [(layer, p) for p in range(first, all_positions) for layer in range(max_layer)]
    for layer, p in tqdm(grid, desc="direction selection", unit="candidate"):
        r = directions[layer, p]
        edit, embed_edit = direction_ablation(r)
        bypass = forwards.refusal_scores(harmful_val, edit, embed_edit).mean().item()
        induce = forwards.refusal_scores(harmless_val, direction_addition(r, layer)).mean().item()
        ablated = forwards.first_token_logits(harmless_val, edit, embed_edit)
        kl = first_token_kl(clean_harmless, ablated).mean().item()
        scores.append(
            DirectionScore(layer=layer, position=positions[p], bypass=bypass, induce=induce, kl=kl)
        )
    best = min(_admissible(scores, kl_max, induce_min), key=lambda s: s.bypass)
    p = positions.index(best.position)
    return Selection(best.layer, best.position, directions[best.layer, p], scores)


def _admissible(
    scores: list[DirectionScore], kl_max: float, induce_min: float
) -> list[DirectionScore]:
    """Candidates passing both of Arditi et al.'s filters; where none does, those passing
    the induce filter (the direction must carry refusal), then the KL one, then all."""
    induces = [s for s in scores if s.induce > induce_min]
    gentle = [s for s in scores if s.kl < kl_max]
    return [s for s in induces if s in gentle] or induces or gentle or scores


def candidate_directions(
    lm: LM, selection: Selection, directions: torch.Tensor, layers: Iterable[int], mode: str
) -> dict[int, torch.Tensor]:
    """The direction each SAE layer's decoder rows are ranked against: the selected one at
    every layer ("selected"), or that layer's own difference of means at the selected
    position ("per_layer")."""
    if mode == "selected":
        return dict.fromkeys(layers, selection.direction)
    p = post_instruction_positions(lm).index(selection.position)
    return {layer: directions[layer, p] for layer in layers}


def candidates(
    saes: dict[int, SAE],
    targets: dict[int, torch.Tensor],
    latents: dict[int, torch.Tensor],
    top_k: int,
    cos_floor: float,
    min_activation: float = 0.0,
) -> list[tuple[Feature, float]]:
    """Per SAE layer, the latents whose decoder rows are most aligned with that layer's
    target direction (candidate_directions), kept where active on the prompt.

    latents: the prompt's clean latents per layer, (T, d_sae) each.
    """
    found = []
    for layer, sae in saes.items():
        r = targets[layer].to(sae.W_dec)
        cos = torch.nn.functional.cosine_similarity(sae.W_dec, r.unsqueeze(0), dim=-1)
        active = latents[layer].max(0).values > min_activation
        cos = torch.where(active & (cos >= cos_floor), cos, torch.full_like(cos, -2.0))
        top = cos.topk(min(top_k, len(cos)))
        found += [
            (Feature(layer, int(i)), float(c)) for c, i in zip(top.values, top.indices) if c > -2.0
        ]
    return found
