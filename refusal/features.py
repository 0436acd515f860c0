"""A feature is one SAE latent at a named site of the model; this module owns its text form.

`L12/255` is latent 255 of the SAE on the residual stream after block 12 (the site
`resid_post`, which every SAE of this project reads). Other sites write their name:
`L12.mlp_out/255`. Every record, table and W&B panel uses this one form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import torch

RESID_POST = "resid_post"
_TEXT = re.compile(r"^L(\d+)(?:\.(\w+))?/(\d+)$")


@dataclass(frozen=True, order=True)
class Feature:
    """One SAE latent: the layer (output of decoder block `layer`), its index, its site."""

    layer: int
    latent: int
    site: str = RESID_POST

    def __str__(self) -> str:
        site = "" if self.site == RESID_POST else f".{self.site}"
        return f"L{self.layer}{site}/{self.latent}"

    @classmethod
    def parse(cls, text: str) -> Feature:
        """The feature written as `L<layer>/<latent>` (or `L<layer>.<site>/<latent>`)."""
        match = _TEXT.match(text)
        if match is None:
            raise ValueError(f"{text!r} is not a feature: expected L<layer>/<latent>, e.g. L12/255")
        layer, site, latent = match.groups()
        return cls(int(layer), int(latent), site or RESID_POST)


def parse_all(texts: list[str]) -> list[Feature]:
    return [Feature.parse(t) for t in texts]


class Probe(Protocol):
    """Scores intervention masks over a feature list for one prompt (higher = more refusal).

    The engine bound to a prompt (engine.PromptProbe) is one; tests plant synthetic ones.
    """

    def score(self, features: list[Feature], masks: torch.Tensor) -> torch.Tensor: ...

    def latents(
        self, features: list[Feature] | None = None, mask: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]: ...
