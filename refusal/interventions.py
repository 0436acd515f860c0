"""Interventions: the edits of the residual stream that the search applies.

Feature interventions act on SAE latents, one batch row per mask. Every selected SAE is
spliced in with its error term kept,
    h ← decode(edit(encode(h))) + (h − decode(encode(h))),
so an empty edit is an exact identity and only the chosen latents change. Each
intervention therefore reduces to a change of the residual, `delta`, at the layers of
its features:
- Ablation: latents S scaled by c lose (1−c)·fᵢ(h) each, −Σ_{i∈S} (1−c)·fᵢ(h)·W_dec[i]
  (zero: c = 0; a negative scale clamps). For ReLU / JumpReLU SAEs fᵢ needs only encoder
  row i, so a mask costs O(|S|·d) per token, whatever the SAE width; TopK SAEs couple
  their latents through the ranking and take a full encode.
- Steer: α·Σ_{i∈S} W_dec[i] added at every position (a positive α pushes the feature).
`search.intervention` names the one the engine applies; its settings are `search.<name>`.
A new one is a class here with `delta` and `weights`, and its section in conf/search/.
Positions holding special tokens (BOS, `<|im_start|>`, `<|im_end|>`, …) are left alone
unless `special_tokens` is set: SAEs are often trained without them (sae-lens's
`exclude_special_tokens`), and editing the attention sink that the first of them holds
disturbs every later position, whatever the feature means (`sparing`).

Direction edits (Arditi et al.) act on the refusal direction instead of latents: it is
projected out of every residual write, or added at one layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from sae_lens import SAE, JumpReLUSAE, StandardSAE

from refusal.errors import ConfigError
from refusal.features import Feature

# An edit of the residual stream at the output of one block: (layer, hidden) -> hidden.
Edit = Callable[[int, torch.Tensor], torch.Tensor]
EmbedEdit = Callable[[torch.Tensor], torch.Tensor]
# The positions of a batch of token ids (B, T) that an edit leaves alone, or None for none.
Spare = Callable[[torch.Tensor], torch.Tensor | None]
POSITIONS = ("all", "prompt")


def sparse(sae: SAE) -> bool:
    """Whether each latent depends only on its own encoder row (and nothing rescales)."""
    return (
        type(sae) in (StandardSAE, JumpReLUSAE)
        and sae.cfg.normalize_activations in ("none", "expected_average_only_in")
        and sae.cfg.reshape_activations == "none"
    )


def latent_acts(sae: SAE, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Activations of latents `idx` on residual `h` (..., d) -> (..., len(idx))."""
    if not sparse(sae):
        return sae.encode(h)[..., idx]
    x = h.to(sae.dtype) - sae.b_dec * sae.cfg.apply_b_dec_to_input
    pre = x @ sae.W_enc[:, idx] + sae.b_enc[idx]
    acts = torch.relu(pre)
    if isinstance(sae, JumpReLUSAE):
        acts = acts * (pre > sae.threshold[idx])
    return acts


class Intervention(ABC):
    """What a mask does to the features it selects; see the module docstring."""

    # "all": generated tokens too, so the edit holds while the reply is written;
    # "prompt": prompt tokens only
    positions: str
    # whether positions holding special tokens are edited too
    special_tokens: bool
    # whether `delta` reads the latents' activations (the engine passes cached ones)
    uses_activations: bool
    # whether editing a latent that is zero at every position is no edit at all (the
    # engine then lets rows that differ only in silent latents share blocks)
    silent_is_identity: bool

    def weights(self, masks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per row and feature, how strongly it is intervened on (masks: (B, k) in {0,1})."""
        return masks.to(dtype)

    @abstractmethod
    def delta(
        self,
        sae: SAE,
        h: torch.Tensor,
        idx: torch.Tensor,
        weight: torch.Tensor,
        acts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The residual change at one layer: h (B, T, d), latents idx, weight (B, 1, k)."""

    def check(self, where: str) -> None:
        """Reject settings outside their choices; `where` is their config key."""
        if self.positions not in POSITIONS:
            raise ConfigError(
                f"{where}.positions={self.positions} is not one of {list(POSITIONS)}."
            )


@dataclass(frozen=True)
class Ablation(Intervention):
    """Latents zeroed, or scaled by `scale` (negative values clamp)."""

    mode: str = "zero"
    scale: float = 0.0
    positions: str = "all"
    special_tokens: bool = False
    uses_activations = True
    silent_is_identity = True  # a latent at zero loses nothing

    @property
    def strength(self) -> float:
        """1 − c: the fraction of each latent's activation that is removed."""
        return 1.0 if self.mode == "zero" else 1.0 - self.scale

    def weights(self, masks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return masks.to(dtype) * self.strength

    def delta(self, sae, h, idx, weight, acts=None) -> torch.Tensor:
        """The splice's change when latents idx lose `weight` of their value: sparse
        encoder rows where the SAE allows (or `acts` are given), a full encode else."""
        if sparse(sae) or acts is not None:
            acts = latent_acts(sae, h, idx) if acts is None else acts
            return -((acts * weight) @ sae.W_dec[idx]).to(h.dtype)
        z = sae.encode(h)
        edited = z.clone()
        edited[..., idx] = z[..., idx] * (1 - weight)
        return (sae.decode(edited) - sae.decode(z)).to(h.dtype)

    def check(self, where: str) -> None:
        super().check(where)
        if self.mode not in ("zero", "scale"):
            raise ConfigError(f"{where}.mode={self.mode} is not one of ['zero', 'scale'].")


@dataclass(frozen=True)
class Steer(Intervention):
    """α times each selected feature's decoder row added to the residual, at every position."""

    alpha: float = 4.0
    positions: str = "all"
    special_tokens: bool = False
    uses_activations = False
    silent_is_identity = False  # the decoder row is added whatever the latent reads

    def weights(self, masks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return masks.to(dtype) * self.alpha

    def delta(self, sae, h, idx, weight, acts=None) -> torch.Tensor:
        return (weight @ sae.W_dec[idx].to(weight.dtype)).to(h.dtype)


class FeatureEdit:
    """The residual edit applying `intervention`, for batch row b, to the features mask[b]
    selects. `cached` = (layer, latents (T, d_sae)): activations already known there."""

    def __init__(
        self,
        intervention: Intervention,
        saes: dict[int, SAE],
        features: list[Feature],
        masks: torch.Tensor,
        dtype: torch.dtype,
        cached: tuple[int, torch.Tensor] | None = None,
    ):
        self.intervention, self.saes, self.cached = intervention, saes, cached
        weights = intervention.weights(masks, dtype)
        self.by_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in sorted({f.layer for f in features}):
            cols = [i for i, f in enumerate(features) if f.layer == layer]
            idx = torch.tensor([features[i].latent for i in cols], device=masks.device)
            self.by_layer[layer] = (idx, weights[:, cols].unsqueeze(1))  # (B, 1, k)

    @property
    def layers(self) -> list[int]:
        return list(self.by_layer)

    def __call__(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        if layer not in self.by_layer:
            return h
        idx, weight = self.by_layer[layer]
        sae = self.saes[layer]
        acts = None
        cached = self.cached if self.cached is not None and self.cached[0] == layer else None
        if cached is not None and self.intervention.uses_activations:
            acts = cached[1][..., idx].to(sae.dtype)  # no mask changes them: no encode
        return h + self.intervention.delta(sae, h, idx, weight, acts)


def sparing(edit: Edit, spared: torch.Tensor | None) -> Edit:
    """`edit`, except at the positions `spared` marks ((B or 1, T), True: left as they were)."""
    if spared is None:
        return edit
    keep = spared.unsqueeze(-1)
    return lambda layer, h: torch.where(keep, h, edit(layer, h))


# -- the refusal direction ------------------------------------------------------------


def project_out(h: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    return h - (h @ unit).unsqueeze(-1) * unit


def direction_ablation(r: torch.Tensor) -> tuple[Edit, EmbedEdit]:
    """Edits removing direction r from the residual everywhere: after every block and at
    the embeddings (Arditi et al. ablate it from every residual write)."""
    unit = (r / r.norm()).float()

    def edit(layer: int, h: torch.Tensor) -> torch.Tensor:
        return project_out(h, unit.to(h.dtype))

    return edit, lambda h: project_out(h, unit.to(h.dtype))


def direction_addition(r: torch.Tensor, layer: int) -> Edit:
    """Edit adding r to the residual at one layer (the layer r was read from)."""

    def edit(at: int, h: torch.Tensor) -> torch.Tensor:
        return h + r.to(h.dtype) if at == layer else h

    return edit


def only_at(edit: Edit, layer: int) -> Edit:
    """`edit` at one layer, the identity elsewhere."""
    return lambda at, h: edit(at, h) if at == layer else h
