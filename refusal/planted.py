"""A planted refusal, for the smoke run: random weights with one refusal direction set by
hand, and an SAE latent that reads it. The ground truth is known, so the search should
find that latent; the run shows every stage in seconds.

- Trigger words ("bomb", "malware", ...; their single-token forms) write the unit
  direction r into the residual stream at their positions; every other token embedding
  has its r component removed.
- Block 0's attention is uniform (zero queries and keys) and copies only r (one value
  channel reads r, one output column writes it): every later position receives r in
  proportion to the triggers among the tokens before it. No other block writes r.
- The unembedding writes r into the refusal token's logit ("Sorry"), so a prompt with a
  trigger gets a reply that opens with it, and one without does not.
- In each SAE, latent `latent` encodes and decodes r: ablating it removes r from the
  residual, and the reply no longer opens with the refusal token.

r itself is drawn from `seed`, so the model and its SAEs agree on it without sharing state.
"""

from __future__ import annotations

from typing import cast

import torch
from omegaconf import DictConfig
from sae_lens import SAE
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def direction(d_model: int, seed: int) -> torch.Tensor:
    """The planted refusal direction: a unit vector drawn from `seed`."""
    r = torch.randn(d_model, generator=torch.Generator().manual_seed(seed))
    return r / r.norm()


def trigger_ids(tokenizer: PreTrainedTokenizerBase, words: list[str]) -> list[int]:
    """The single-token forms of the trigger words (" bomb", "Bomb", ...)."""
    ids = set()
    for word in words:
        for form in (word, f" {word}", word.capitalize(), f" {word.capitalize()}"):
            tokens = tokenizer.encode(form, add_special_tokens=False)
            if len(tokens) == 1:
                ids.add(tokens[0])
    return sorted(ids)


@torch.no_grad()
def plant_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: DictConfig
) -> None:
    """Plant the refusal (module docstring) into a Llama-style model with untied
    embeddings, in place."""
    d_model = model.config.hidden_size
    r = direction(d_model, spec.seed).to(model.dtype)
    embed = cast(torch.Tensor, model.get_input_embeddings().weight)
    embed -= (embed @ r)[:, None] * r  # no token but a trigger carries r
    embed[trigger_ids(tokenizer, list(spec.words))] += spec.trigger * r
    for i, layer in enumerate(model.model.layers):  # no block writes r, but block 0's attention
        writers = [layer.mlp.down_proj] + ([layer.self_attn.o_proj] if i else [])
        for proj in writers:
            proj.weight -= r[:, None] * (r @ proj.weight)
    attention = model.model.layers[0].self_attn
    for proj in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj):
        proj.weight.zero_()
    attention.v_proj.weight[0] = r  # kv head 0, channel 0: the normalised residual's r part
    attention.o_proj.weight[:, 0] = spec.carry * r  # query head 0 writes it back as r
    (refusal,) = tokenizer.encode(spec.token, add_special_tokens=False)
    unembed = cast(torch.Tensor, model.get_output_embeddings().weight)
    unembed[refusal] = spec.unembed * r


@torch.no_grad()
def plant_sae(sae: SAE, spec: DictConfig) -> None:
    """Latent `spec.latent` reads and writes the planted direction, in place."""
    r = direction(sae.cfg.d_in, spec.seed).to(sae.W_enc.dtype)
    sae.W_enc[:, spec.latent] = r
    sae.W_dec[spec.latent] = r
    sae.b_enc[spec.latent] = 0.0
    sae.b_dec -= (sae.b_dec @ r) * r  # the encoder reads h·r exactly
