"""The naive reference: HF's own forward and `generate`, each SAE spliced in by hooks
with sae-lens's full encode / decode, one mask at a time or batched.

What a careful user writes without the engine; the tests hold the engine to it and the
benchmark times it. Nothing here is cached or sparse on purpose. Positions the engine
spares (special tokens, `Engine.spared`) are left out of the hooked edit alike.
"""

from __future__ import annotations

from typing import cast

import torch
from tqdm import tqdm

from refusal import judge
from refusal.engine import Engine
from refusal.features import Feature
from refusal.forwards import hooked
from refusal.interventions import Ablation, Edit, Steer
from refusal.models import LM


def _per_layer(
    engine: Engine, features: list[Feature], weights: torch.Tensor
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    device = engine.lm.device
    by_layer = {}
    for layer in engine.saes:
        cols = [i for i, f in enumerate(features) if f.layer == layer]
        idx = torch.tensor([features[i].latent for i in cols], dtype=torch.long, device=device)
        by_layer[layer] = idx, weights[:, cols].to(device=device, dtype=engine.lm.dtype)
    return by_layer


def splice_edit(engine: Engine, features: list[Feature], masks: torch.Tensor) -> Edit:
    """sae-lens's full encode/decode splice, error term kept:
    h ← decode(edit(encode(h))) + (h − decode(encode(h))), row b ablating masks[b]."""
    ablation = engine.intervention
    assert isinstance(ablation, Ablation)
    by_layer = _per_layer(engine, features, masks * ablation.strength)

    def edit(layer: int, h: torch.Tensor) -> torch.Tensor:
        sae, (idx, weight) = engine.saes[layer], by_layer[layer]
        z = sae.encode(h)
        edited = z.clone()
        rows = min(len(weight), len(h))
        edited[..., idx] = z[..., idx] * (1 - weight[:rows].unsqueeze(1))
        return sae.decode(edited) + (h - sae.decode(z))

    return edit


def steer_edit(engine: Engine, features: list[Feature], masks: torch.Tensor) -> Edit:
    """α times the selected decoder rows added at every position, row by row."""
    steer = engine.intervention
    assert isinstance(steer, Steer)
    by_layer = _per_layer(engine, features, masks.float())

    def edit(layer: int, h: torch.Tensor) -> torch.Tensor:
        sae, (idx, weight) = engine.saes[layer], by_layer[layer]
        out = h.clone()
        for row in range(len(h)):
            for k, latent in enumerate(idx.tolist()):
                out[row] += steer.alpha * weight[min(row, len(weight) - 1), k] * sae.W_dec[latent]
        return out

    return edit


def reference_edit(engine: Engine, features: list[Feature], masks: torch.Tensor) -> Edit:
    """The hooked edit of the engine's intervention."""
    make = steer_edit if isinstance(engine.intervention, Steer) else splice_edit
    return make(engine, features, masks)


def hooked_scores(
    engine: Engine, prompt: str, features: list[Feature], masks: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Opening scores from HF's own forward and greedy generate, the edit hooked in."""
    batch = engine.lm.tokenize([prompt])
    prompt_only = engine.intervention.positions == "prompt"
    scores = []
    for i in range(0, len(masks), batch_size):
        chunk = masks[i : i + batch_size]
        edit = reference_edit(engine, features, chunk)
        with (
            hooked(engine.lm, edit, engine.saes, prompt_only=prompt_only, spare=engine.spared),
            torch.no_grad(),
        ):
            out = engine.lm.generator.generate(
                **{k: v.expand(len(chunk), -1) for k, v in batch.items()},
                max_new_tokens=engine.openings.depth,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=engine.lm.tokenizer.pad_token_id,
            )
        scores.append(replayed_scores(engine.openings, out, batch["input_ids"].shape[1]).cpu())
    return torch.cat(scores)


def replayed_scores(openings: judge.Openings, out, prompt_len: int) -> torch.Tensor:
    """Opening scores of a greedy `generate` output, its logits replayed to the walk."""
    rows, steps = torch.arange(len(out.sequences)), iter(enumerate(out.logits[1:], prompt_len))

    def next_logits(keep: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # tokens after the first are the trie's guess of the greedy path: where a row
        # leaves it the walk stops, so the greedy path's logits serve up to there
        nonlocal rows
        rows = rows[keep.cpu()]
        read = [next(steps) for _ in range(tokens.shape[1])]
        assert torch.equal(out.sequences[rows, read[0][0]], tokens[:, 0]), (
            "walk left the greedy path"
        )
        return torch.stack([logits[rows] for _, logits in read], 1)

    return openings.score(out.logits[0], next_logits)


def naive_replies(
    engine: Engine, prompt: str, features: list[Feature], masks: torch.Tensor, max_new_tokens: int
) -> list[str]:
    """Per mask: the edit hooked in, greedy tokens to the end of the turn (at most
    `max_new_tokens`), the assistant's turn."""
    batch = engine.lm.tokenize([prompt])
    prompt_only = engine.intervention.positions == "prompt"
    replies = []
    for mask in tqdm(masks, desc="naive (hooks + generation)", unit="mask"):
        edit = reference_edit(engine, features, mask[None])
        with (
            hooked(engine.lm, edit, engine.saes, prompt_only=prompt_only, spare=engine.spared),
            torch.no_grad(),
        ):
            out = engine.lm.generator.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                eos_token_id=engine.lm.end_of_turn_ids,
                do_sample=False,
                pad_token_id=engine.lm.tokenizer.pad_token_id,
            )
        replies.append(assistant_turn(engine.lm, out[0, batch["input_ids"].shape[1] :]))
    return replies


def assistant_turn(lm: LM, reply_ids: torch.Tensor) -> str:
    """The text of a generated reply up to the end of the assistant's turn."""
    ends = torch.isin(reply_ids, torch.tensor(lm.end_of_turn_ids, device=reply_ids.device))
    cut = int(ends.nonzero()[0]) if ends.any() else len(reply_ids)
    return cast(str, lm.tokenizer.decode(reply_ids[:cut], skip_special_tokens=True))  # 1-D ids


def flipped(replies: list[str]) -> list[bool]:
    """The naive judge's decisions: no refusal marker in the reply."""
    return [not judge.is_refusal(reply) for reply in replies]
