"""The ablation engine: prefix-cached, batched scoring of SAE-latent ablation masks.

Every selected SAE is spliced in with its error term kept,
    h ← decode(edit(encode(h))) + (h − decode(encode(h))),
so an empty edit is an exact identity and ablating latent set S (scaling each by c)
changes the residual by exactly −Σ_{i∈S} (1−c)·fᵢ(h)·W_dec[i]. For ReLU / JumpReLU SAEs
fᵢ needs only encoder row i, so a mask costs O(|S|·d) per token, whatever the SAE width.
TopK SAEs couple their latents through the ranking: they take a full encode per edit.

For one prompt the engine runs the model once up to the first SAE layer and caches
that residual, its keys and values, and the SAE latents there (no mask can change them).
Scoring a batch of masks then runs only the remaining blocks over the prompt (rows that
ablate the same features up to an SAE layer run the blocks before it once); rows whose
greedy reply opens like a refusal then decode a few more tokens, one at a time through a
KV cache, to see whether it becomes a whole refusal marker (judge.Openings).
All stages score through this engine.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from sae_lens import SAE, JumpReLUSAE, StandardSAE

from refusal.allocator import keep_freed_memory
from refusal.errors import NumericsError
from refusal.judge import Openings, refusal_openings, refusal_score
from refusal.models import LM, Edit, KVCache


@dataclass(frozen=True, order=True)
class Feature:
    """One SAE latent: residual layer and latent index."""

    layer: int
    latent: int

    def __str__(self) -> str:
        return f"L{self.layer}/{self.latent}"


@dataclass(frozen=True)
class Ablation:
    """How latents are ablated: zeroed, or scaled by `scale` (negative values clamp)."""

    mode: str = "zero"
    scale: float = 0.0
    positions: str = "all"  # "all": generated tokens too; "prompt": prompt tokens only

    @property
    def strength(self) -> float:
        """1 − c: the fraction of each latent's activation that is removed."""
        return 1.0 if self.mode == "zero" else 1.0 - self.scale


@dataclass
class PromptCache:
    """One prompt, run once up to the engine's first SAE layer."""

    instruction: str
    input_ids: torch.Tensor  # (1, T)
    hidden: torch.Tensor  # (1, T, d): residual at layer `start`, before any edit
    latents: torch.Tensor  # (T, d_sae): the first SAE's latents on `hidden`
    kv: KVCache  # keys and values of blocks 0..start
    score: float  # clean opening score


def _sparse(sae: SAE) -> bool:
    """Whether each latent depends only on its own encoder row (and nothing rescales)."""
    return (
        type(sae) in (StandardSAE, JumpReLUSAE)
        and sae.cfg.normalize_activations in ("none", "expected_average_only_in")
        and sae.cfg.reshape_activations == "none"
    )


def latent_acts(sae: SAE, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Activations of latents `idx` on residual `h` (..., d) -> (..., len(idx))."""
    if not _sparse(sae):
        return sae.encode(h)[..., idx]
    x = h.to(sae.dtype) - sae.b_dec * sae.cfg.apply_b_dec_to_input
    pre = x @ sae.W_enc[:, idx] + sae.b_enc[idx]
    acts = torch.relu(pre)
    if isinstance(sae, JumpReLUSAE):
        acts = acts * (pre > sae.threshold[idx])
    return acts


def ablation_delta(
    sae: SAE,
    h: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    acts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Change of the error-preserving splice when latents idx lose `weight` of their value.

    weight broadcasts against (..., T, len(idx)); `acts` may pass precomputed activations.
    """
    if _sparse(sae) or acts is not None:
        acts = latent_acts(sae, h, idx) if acts is None else acts
        return -((acts * weight) @ sae.W_dec[idx]).to(h.dtype)
    z = sae.encode(h)
    edited = z.clone()
    edited[..., idx] = z[..., idx] * (1 - weight)
    return (sae.decode(edited) - sae.decode(z)).to(h.dtype)


class MaskEdit:
    """The residual edit that ablates, for batch row b, the features mask[b] selects."""

    def __init__(
        self,
        engine: Engine,
        features: list[Feature],
        masks: torch.Tensor,
        first_latents: torch.Tensor | None = None,
    ):
        self.engine = engine
        self.first_latents = first_latents
        self.by_layer = {}
        weights = masks.to(engine.lm.dtype) * engine.ablation.strength
        for layer in sorted({f.layer for f in features}):
            cols = [i for i, f in enumerate(features) if f.layer == layer]
            idx = torch.tensor([features[i].latent for i in cols], device=masks.device)
            self.by_layer[layer] = (idx, weights[:, cols].unsqueeze(1))  # (B, 1, k)

    def __call__(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        if layer not in self.by_layer:
            return h
        idx, weight = self.by_layer[layer]
        sae = self.engine.saes[layer]
        acts = None
        if layer == self.engine.start and self.first_latents is not None:
            acts = self.first_latents[..., idx].to(sae.dtype)  # cached: no mask changes them
        return h + ablation_delta(sae, h, idx, weight, acts)


class Engine:
    """Scores ablation masks for a model and its SAEs; see the module docstring."""

    def __init__(
        self,
        lm: LM,
        saes: dict[int, SAE],
        refusal_ids: list[int],
        ablation: Ablation = Ablation(),
        batch_size: int = 64,
        compile: bool = False,
        openings: Openings | None = None,
        tune: bool = False,
    ):
        self.lm, self.saes, self.refusal_ids, self.ablation = lm, saes, refusal_ids, ablation
        self.openings = openings or refusal_openings(lm)
        if compile:
            lm.compile_blocks()
        if lm.device.type == "cpu":
            keep_freed_memory()
        self.start = min(saes)
        self.batch_size = batch_size
        self.tune = tune  # tune the batch size on the first masks scored, then keep it
        self.evals = 0  # masks scored so far, for reporting

    # -- per-prompt cache and the hot loop ---------------------------------------------

    @torch.no_grad()
    def prepare(self, instruction: str) -> PromptCache:
        """Run the prompt to the first SAE layer once; check numerics on a clean pass."""
        batch = self.lm.tokenize([instruction])
        kv = KVCache()
        h = self.lm.run_blocks(
            self.lm.embed(batch["input_ids"]), 0, self.start + 1, edit=_check_finite, cache=kv
        )
        latents = self.saes[self.start].encode(h[0])
        lower = copy.deepcopy(kv)
        rest = self.lm.run_blocks(h, self.start + 1, edit=_check_finite, cache=kv)
        score = self._opening_scores(rest[:, -1], [], torch.ones(1, 0, device=h.device), kv).item()
        return PromptCache(instruction, batch["input_ids"], h, latents, lower, score)

    @torch.no_grad()
    def score(
        self, cache: PromptCache, features: list[Feature], masks: torch.Tensor
    ) -> torch.Tensor:
        """Opening refusal score for each mask row (masks: (B, len(features)) in {0,1}).

        A row repeated (the FM's random masks repeat a few percent) is scored once.
        """
        masks = torch.as_tensor(masks, device=self.lm.device)
        if masks.ndim == 1:
            masks = masks.unsqueeze(0)
        if self.tune:
            self.tune = False
            self.tune_batch_size(cache, features)
        distinct, row = torch.unique(masks, dim=0, return_inverse=True)
        scores = self._batched(distinct, lambda chunk: self._score_chunk(cache, features, chunk))
        self.evals += len(distinct)
        return scores[row.cpu()]

    def _score_chunk(
        self, cache: PromptCache, features: list[Feature], masks: torch.Tensor, share: bool = True
    ) -> torch.Tensor:
        """Scores of a batch of masks. Rows that ablate the same features up to an SAE
        layer run the blocks before it once: the batch branches at each SAE layer into
        the distinct masks so far (greedy's single removals and the dormant checks differ
        only late). share=False runs every row through every block, as the FM's random
        masks do anyway."""
        kv = copy.deepcopy(cache.kv)
        h = cache.hidden  # one state, the clean prompt; state[r]: row r's state in h
        state = torch.zeros(len(masks), dtype=torch.long, device=masks.device)
        own = torch.arange(len(masks), device=masks.device)[:, None]  # share=False: one each
        layers = sorted(self.saes)
        for layer, stop in zip(layers, [*layers[1:], self.lm.n_layers - 1]):
            cols = [i for i, f in enumerate(features) if f.layer == layer]
            key = torch.cat([state[:, None], masks[:, cols].long(), *([] if share else [own])], 1)
            state, first = _unique_rows(key)
            parent = key[first, 0]  # the state each new one branches from
            if not torch.equal(parent, torch.arange(len(h), device=h.device)):
                h = h[parent]
                kv.batch_select_indices(parent)
            edit = MaskEdit(self, features, masks[first], first_latents=cache.latents)
            h = self.lm.run_blocks(edit(layer, h), layer + 1, stop + 1, cache=kv)
        rows = _unique_rows(state[:, None])[1]  # a row of each final state, in state order
        return self._opening_scores(h[:, -1], features, masks[rows], kv)[state].cpu()

    def _opening_scores(
        self, last: torch.Tensor, features: list[Feature], masks: torch.Tensor, kv: KVCache
    ) -> torch.Tensor:
        """Opening scores from the final residual `last` (B, d) of prompts whose keys and
        values `kv` holds, decoding greedy tokens under each row's mask (judge.Openings)."""
        past = kv.get_seq_length()

        def next_logits(keep: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            nonlocal masks, past
            kv.batch_select_indices(keep.nonzero().squeeze(-1))
            masks = masks[keep]
            # a new token: its latents are not cached, and "prompt" ablation leaves it alone
            edit = MaskEdit(self, features, masks) if self.ablation.positions == "all" else None
            h = self.lm.embed(tokens[:, None])
            h = self.lm.run_blocks(h, 0, edit=edit, cache=kv, past=past)
            past += 1
            return self.lm.next_token_logits(h[:, -1])

        return self.openings.score(self.lm.next_token_logits(last), next_logits)

    @torch.no_grad()
    def tune_batch_size(
        self,
        cache: PromptCache,
        features: list[Feature],
        max_batch: int = 1024,
        min_gain: float = 0.05,
    ) -> int:
        """Set the batch size to the largest that fits and still speeds scoring up.

        Doubles from 1, timing batches of the empty mask (the best of two runs after two
        warm-ups: compiled blocks may specialise on a new size more than once); stops at the
        first size that gains less than `min_gain` or runs out of memory. Every row
        then costs the same, the prompt's own reply decoded through the refusal openings,
        so sizes compare fairly; random masks would leave the trie at random rows. The rows
        share no blocks, as the FM's random masks seldom do.
        """
        masks = torch.zeros(max_batch, len(features), device=self.lm.device)
        best_rate, best, size = 0.0, 1, 1
        while size <= max_batch:
            try:
                chunk = masks[:size]
                for _ in range(2):
                    self._score_chunk(cache, features, chunk, share=False)
                rate = size / min(self._timed_chunk(cache, features, chunk) for _ in range(2))
            except torch.OutOfMemoryError:
                break
            if rate < best_rate * (1 + min_gain):
                break
            best_rate, best, size = rate, size, size * 2
        self.batch_size = best
        return best

    def _timed_chunk(self, cache: PromptCache, features: list[Feature], masks) -> float:
        began = time.perf_counter()
        self._score_chunk(cache, features, masks, share=False)
        if masks.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - began

    def _batched(
        self, rows: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Apply fn to chunks of rows, halving the batch size on out-of-memory."""
        out, i = [], 0
        while i < len(rows):
            chunk = rows[i : i + self.batch_size]
            try:
                out.append(fn(chunk))
            except torch.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size //= 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            i += len(chunk)
        return torch.cat(out)

    # -- full encodes, once per prompt -------------------------------------------------

    @torch.no_grad()
    def latents(
        self,
        cache: PromptCache,
        features: list[Feature] | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """Every SAE's latents (T, d_sae) on this prompt, under an optional ablation mask.

        Latents at a layer are read before that layer's own edit is applied.
        """
        features = features or []
        mask = (
            torch.ones(1, len(features)) if mask is None else torch.as_tensor(mask).reshape(1, -1)
        )
        edit = MaskEdit(self, features, mask.to(self.lm.device), first_latents=cache.latents)
        seen = {self.start: cache.latents}

        def record(layer: int, h: torch.Tensor) -> torch.Tensor:
            if layer in self.saes:
                seen[layer] = self.saes[layer].encode(h[0])
            return edit(layer, h)

        h = edit(self.start, cache.hidden)
        self.lm.run_blocks(h, self.start + 1, stop=max(self.saes) + 1, edit=record)
        return seen

    # -- batched full forwards over many prompts ---------------------------------------

    @torch.no_grad()
    def first_token_logits(
        self,
        instructions: list[str],
        edit: Edit | None = None,
        embed_edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Next-token logits (N, vocab) at the reply's start, with an optional residual edit."""
        out = []
        for i in range(0, len(instructions), self.batch_size):
            batch = self.lm.tokenize(instructions[i : i + self.batch_size])
            h = self.lm.embed(batch["input_ids"])
            h = embed_edit(h) if embed_edit else h
            h = self.lm.run_blocks(h, 0, attention_mask=batch["attention_mask"], edit=edit)
            out.append(self.lm.next_token_logits(h[:, -1]).float().cpu())
        return torch.cat(out)

    def refusal_scores(
        self,
        instructions: list[str],
        edit: Edit | None = None,
        embed_edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return refusal_score(
            self.first_token_logits(instructions, edit, embed_edit), self.refusal_ids
        )

    @torch.no_grad()
    def residual_means(self, instructions: list[str], positions: list[int]) -> torch.Tensor:
        """Mean residual (n_layers, len(positions), d) at the given (negative) token positions."""
        total = torch.zeros(self.lm.n_layers, len(positions), self.lm.d_model, dtype=torch.float64)
        pos = torch.tensor(positions)

        def record(layer: int, h: torch.Tensor) -> torch.Tensor:
            total[layer] += h[:, pos].double().sum(0).cpu()
            return h

        for i in range(0, len(instructions), self.batch_size):
            batch = self.lm.tokenize(instructions[i : i + self.batch_size])
            h = self.lm.embed(batch["input_ids"])
            self.lm.run_blocks(h, 0, attention_mask=batch["attention_mask"], edit=record)
        return (total / len(instructions)).float()

    def feature_edit(self, features: list[Feature]) -> MaskEdit:
        """The edit ablating all `features` on every row of any batch, on any prompt."""
        return MaskEdit(self, features, torch.ones(1, len(features), device=self.lm.device))

    # -- generation, to verify flips --------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        instructions: list[str],
        features: list[Feature] | None = None,
        max_new_tokens: int = 48,
    ) -> list[str]:
        """Greedy replies with `features` ablated (prompt tokens only, or all, per Ablation)."""
        batch = self.lm.tokenize(instructions)
        edit = self.feature_edit(features or [])
        with self.hooked(edit, edit.by_layer):
            out = self.lm.model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.lm.tokenizer.pad_token_id,
            )
        return self.lm.tokenizer.batch_decode(
            out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )

    @contextmanager
    def hooked(self, edit: Edit, layers: Iterable[int]) -> Iterator[None]:
        """Apply `edit` at `layers` inside the model's own forward (HF generate) via block
        hooks: on the prompt only, or on generated tokens too, per `Ablation.positions`.

        With KV caching the first forward is the prompt; later ones are generated tokens.
        """
        prompt_only = self.ablation.positions == "prompt"
        state = {"prefill": True}

        def hook(layer: int):
            def apply(module, args, output):
                if state["prefill"] or not prompt_only:
                    return edit(layer, output)
                return output

            return apply

        handles = [self.lm.blocks[layer].register_forward_hook(hook(layer)) for layer in layers]
        last = self.lm.blocks[self.lm.n_layers - 1].register_forward_hook(
            lambda *_: state.update(prefill=False)
        )
        try:
            yield
        finally:
            for handle in [*handles, last]:
                handle.remove()


def _unique_rows(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's index among the distinct rows of `key` (sorted), and the first row
    holding each distinct one."""
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    rows = torch.arange(len(key), device=key.device)
    first = torch.full((len(distinct),), len(key), device=key.device)
    return inverse, first.scatter_reduce(0, inverse, rows, "amin")


def _check_finite(layer: int, h: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(h).all():
        raise NumericsError(
            f"NaN or inf in the residual stream at layer {layer} (dtype {h.dtype}). "
            "Try model.dtype=float32, or bfloat16 instead of float16."
        )
    return h


@dataclass
class PromptProbe:
    """The engine bound to one prompt: what the search stages score masks through."""

    engine: Engine
    cache: PromptCache

    def score(self, features: list[Feature], masks: torch.Tensor) -> torch.Tensor:
        return self.engine.score(self.cache, features, masks)

    def latents(
        self, features: list[Feature] | None = None, mask: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]:
        return self.engine.latents(self.cache, features, mask)
