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

`plant_opening` sets a longer reply for the benchmark's random weights at real sizes
(conf/model/*_shape.yaml): a greedy reply that opens with a whole refusal marker, so the
engine's walk through the markers' trie runs several passes, as on a model that refuses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from omegaconf import DictConfig
from sae_lens import SAE
from transformers import PreTrainedModel, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from refusal.models import LM


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


@torch.no_grad()
def plant_opening(lm: LM, text: str, prompts: list[str], max_scale: float = 2.0**16) -> float:
    """Make `lm`'s greedy reply to each of `prompts` open with `text`, in place; returns
    the scale it took.

    The blocks are left alone; only the unembedding changes (untied from the embeddings
    first). At reply step i the final state (normed) is read into token t_i's logit: t_i's
    row gains `scale` times the i-th vector of the dual basis of the steps' mean states
    (their pseudo-inverse), so the mean state of step i raises t_i's logit by `scale` and
    no other step's target. `scale` doubles from 1 until every prompt's greedy reply,
    teacher-forced along `text`, is `text`.
    """
    model = lm.model
    reply = lm.reply_ids(text)
    states = torch.stack([_reply_states(lm, prompt, reply) for prompt in prompts])  # (P, n, d)
    dual = torch.linalg.pinv(states.mean(0).float())  # (d, n)
    delta = torch.zeros(model.config.vocab_size, lm.d_model)
    delta.index_add_(0, torch.tensor(reply), dual.T)
    delta = delta.to(lm.device)
    head = cast(torch.Tensor, model.get_output_embeddings().weight)
    if head.data_ptr() == cast(torch.Tensor, model.get_input_embeddings().weight).data_ptr():
        head = torch.nn.Parameter(head.detach().clone(), requires_grad=False)
        model.get_output_embeddings().weight = head
        model.config.tie_word_embeddings = False
    logits = states.float() @ head.float().T  # (P, n, vocab); softcapping keeps the argmax
    raised = states.float() @ delta.T
    target = torch.tensor(reply, device=lm.device)
    scale = 1.0
    while not bool(((logits + scale * raised).argmax(-1) == target).all()):
        scale *= 2
        if scale > max_scale:
            raise ValueError(f"no scale up to {max_scale} makes every reply open with {text!r}")
    head += (scale * delta).to(head.dtype)
    return scale


def _reply_states(lm: LM, prompt: str, reply: list[int]) -> torch.Tensor:
    """The final normed states (n, d) at the positions that predict each token of `reply`
    after the chat-formatted prompt."""
    ids = lm.tokenize([prompt])["input_ids"]
    ids = torch.cat([ids, torch.tensor([reply], device=ids.device)], 1)
    hidden = lm.model.model(input_ids=ids).last_hidden_state[0]
    return hidden[-len(reply) - 1 : -1]
