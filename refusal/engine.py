"""The ablation engine: prefix-cached, batched scoring of intervention masks on one prompt.

For one prompt the engine runs the model once up to the first SAE layer and caches
that residual, its keys and values, and the SAE latents there (no mask can change them).
Scoring a batch of masks then runs only the remaining blocks over the prompt, each SAE
layer applying the configured intervention (refusal.interventions) to the features
each row selects, at every position but those holding special tokens (unless
`special_tokens`; the cache holds the residual before any edit either way); rows that
intervene on the same features up to an SAE layer run the blocks before it once, a
latent that reads zero at every edited prompt position counting as untouched (ablating
it changes nothing there; on the reply's tokens each row keeps its own mask). Each call
also runs one reference row through the whole prompt, the mask most rows agree with
(the clean prompt when that is no edit): in a causal model a row's positions before the
first one where its edits and the reference's differ are the reference's at every
block, so a batch starts at its rows' earliest such position, from the reference's keys
and values of the tokens before it (greedy's rows, every candidate ablated but one,
start where that one first fires). Rows
whose greedy reply opens like a refusal then decode a few more tokens through a KV
cache, to see whether it becomes a whole refusal marker (judge.Openings); where the
markers' trie does not branch, the tokens that follow are fed in one pass.
Every search stage scores through this engine; many-prompt passes and generation are
refusal.forwards.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from sae_lens import SAE

from refusal.allocator import keep_freed_memory
from refusal.errors import NumericsError
from refusal.features import Feature
from refusal.interventions import (
    Ablation,
    Edit,
    FeatureEdit,
    Intervention,
    latent_acts,
    sparing,
)
from refusal.judge import Openings, refusal_openings
from refusal.models import LM, KVCache

# A reference row runs every block at every position: on fewer distinct masks than this,
# what it saves them seldom pays for it (greedy's last steps score a few masks each).
REFERENCE_ROWS = 8


@dataclass
class Reference:
    """One mask run through the whole prompt: rows are computed against it."""

    mask: torch.Tensor | None  # (len(features),) in {0,1}; None: no edit, the clean prompt
    residuals: dict[int, torch.Tensor]  # (T, d) at each SAE layer, before that layer's edit
    kv: KVCache  # keys and values at every block


@dataclass
class PromptCache:
    """One prompt, run once clean: what every scoring of it starts from."""

    instruction: str
    input_ids: torch.Tensor  # (1, T)
    hidden: torch.Tensor  # (1, T, d): residual at layer `start`, before any edit
    latents: torch.Tensor  # (T, d_sae): the first SAE's latents on `hidden`
    clean: Reference
    score: float  # clean opening score

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


class Engine:
    """Scores intervention masks for a model and its SAEs; see the module docstring."""

    def __init__(
        self,
        lm: LM,
        saes: dict[int, SAE],
        intervention: Intervention | None = None,
        batch_size: int = 64,
        compile: bool = False,
        openings: Openings | None = None,
        tune: bool = False,
    ):
        self.lm, self.saes = lm, saes
        self.intervention = intervention or Ablation()
        self.openings = openings or refusal_openings(lm)
        if compile:
            lm.compile_blocks()
        if lm.device.type == "cpu":
            keep_freed_memory()
        self.start = min(saes)
        self.batch_size = batch_size
        self.tune = tune  # tune the batch size on the first masks scored, then keep it
        self.evals = 0  # masks scored so far, for reporting

    def feature_edit(
        self,
        features: list[Feature],
        masks: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
    ) -> FeatureEdit:
        """The intervention on `features`, row b of a batch per masks[b] (all of them on
        every row by default), at every position; given the first SAE layer's latents
        there ((T, d_sae), a prompt's cache), that layer reads them instead of encoding."""
        masks = torch.ones(1, len(features), device=self.lm.device) if masks is None else masks
        cached = None if latents is None else (self.start, latents)
        return FeatureEdit(self.intervention, self.saes, features, masks, self.lm.dtype, cached)

    def spared(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The positions of token ids (B, T) that the intervention leaves alone: those
        holding special tokens, unless it edits them too (interventions module docstring)."""
        return None if self.intervention.special_tokens else self.lm.is_special(ids)

    def edit(
        self,
        features: list[Feature],
        masks: torch.Tensor,
        ids: torch.Tensor,
        latents: torch.Tensor | None = None,
    ) -> Edit:
        """feature_edit over the tokens `ids` ((B or 1, T)), their spared positions left alone."""
        return sparing(self.feature_edit(features, masks, latents), self.spared(ids))

    # -- per-prompt cache and the hot loop ---------------------------------------------

    @torch.no_grad()
    def prepare(self, instruction: str) -> PromptCache:
        """Run the prompt once, keeping what scoring starts from; check numerics."""
        ids = self.lm.tokenize([instruction])["input_ids"]
        clean, h = self._recorded(ids, None, _check_finite)
        kv = copy.deepcopy(clean.kv)  # the walk below appends to it
        score = self._opening_scores(h[:, -1], [], torch.ones(1, 0, device=h.device), kv).item()
        start = clean.residuals[self.start][None]
        latents = self.saes[self.start].encode(start[0])
        return PromptCache(instruction, ids, start, latents, clean, score)

    def _recorded(
        self, ids: torch.Tensor, mask: torch.Tensor | None, edit: Edit
    ) -> tuple[Reference, torch.Tensor]:
        """The prompt `ids` run whole under `edit` (that of `mask`), as a Reference, and
        the last block's residual."""
        kv, residuals = KVCache(), {}

        def record(layer: int, h: torch.Tensor) -> torch.Tensor:
            if layer in self.saes:
                residuals[layer] = h[0]
            return edit(layer, h)

        h = self.lm.run_blocks(self.lm.embed(ids), 0, edit=record, cache=kv)
        return Reference(mask, residuals, kv), h

    def reference(
        self, cache: PromptCache, features: list[Feature], masks: torch.Tensor
    ) -> Reference:
        """The Reference for scoring `masks`: the mask most of them agree with, feature by
        feature; the clean prompt, already run, when that ablates nothing or when the
        masks are too few to pay for one more row (REFERENCE_ROWS)."""
        if not self.intervention.silent_is_identity or len(masks) < REFERENCE_ROWS:
            return cache.clean  # (without: the edit acts wherever a row selects a feature)
        mask = (masks.float().mean(0) > 0.5).to(masks.dtype)
        if not mask.any():
            return cache.clean
        edit = self.edit(features, mask[None], cache.input_ids, cache.latents)
        return self._recorded(cache.input_ids, mask, edit)[0]

    def onsets(
        self, cache: PromptCache, features: list[Feature], reference: Reference | None = None
    ) -> torch.Tensor:
        """Per feature, the first prompt position where editing it or not matters on the
        reference (clean by default): where it fires there (anywhere, if the edit does
        not depend on what the latent reads), spared positions left out; the prompt's
        length if none."""
        residuals = (reference or cache.clean).residuals
        onset = torch.full((len(features),), cache.length, dtype=torch.long)
        spared = self.spared(cache.input_ids)
        for layer in sorted({f.layer for f in features}):
            cols = [i for i, f in enumerate(features) if f.layer == layer]
            idx = torch.tensor([features[i].latent for i in cols], device=cache.hidden.device)
            if not self.intervention.silent_is_identity:
                fires = torch.ones(cache.length, len(cols), dtype=torch.bool)
            elif layer == self.start:  # no mask changes the first SAE layer's latents
                fires = (cache.latents[:, idx] > 0).cpu()
            else:
                fires = (latent_acts(self.saes[layer], residuals[layer], idx) > 0).cpu()
            if spared is not None:
                fires &= ~spared[0, :, None].cpu()
            first = fires.float().argmax(0)  # the first True; 0 where there is none
            onset[cols] = torch.where(fires.any(0), first, cache.length)
        return onset

    def starts(
        self,
        cache: PromptCache,
        features: list[Feature],
        masks: torch.Tensor,
        reference: Reference,
    ) -> torch.Tensor:
        """Each row's first position that differs from the reference's: the earliest
        onset of a feature where the two masks differ (by induction over positions: before
        it the same latents fire and the same are edited). At most the last position,
        whose logits are read."""
        differs = masks != (0 if reference.mask is None else reference.mask)
        onset = self.onsets(cache, features, reference).to(masks.device)
        first = torch.where(differs, onset, cache.length - 1)
        return torch.cat([first, first.new_full((len(masks), 1), cache.length - 1)], 1).amin(1)

    @torch.no_grad()
    def score(
        self, cache: PromptCache, features: list[Feature], masks: torch.Tensor
    ) -> torch.Tensor:
        """Opening refusal score for each mask row (masks: (B, len(features)) in {0,1}).

        A row repeated is scored once.
        """
        masks = torch.as_tensor(masks, device=self.lm.device)
        if masks.ndim == 1:
            masks = masks.unsqueeze(0)
        if self.tune:
            self.tune = False
            self.tune_batch_size(cache, features)
        distinct, row = torch.unique(masks, dim=0, return_inverse=True)
        reference = self.reference(cache, features, distinct)
        # rows that part from the reference late batched together: a batch starts at its
        # earliest
        starts = self.starts(cache, features, distinct, reference)
        order = starts.argsort(descending=True, stable=True)
        scored = self._batched(
            distinct[order], lambda chunk: self._score_chunk(cache, features, chunk, reference)
        )
        scores = torch.empty_like(scored)
        scores[order.cpu()] = scored
        self.evals += len(distinct)
        return scores[row.cpu()]

    def _score_chunk(
        self,
        cache: PromptCache,
        features: list[Feature],
        masks: torch.Tensor,
        reference: Reference | None = None,
        share: bool = True,
    ) -> torch.Tensor:
        """Scores of a batch of distinct masks. Rows whose edits agree up to an SAE layer run
        the blocks before it once: the batch branches at each SAE layer into the distinct
        edits so far (greedy's single removals and the dormant checks differ only late).
        Ablating a latent that is zero at every edited prompt position changes nothing, so
        rows that differ only in such latents stay together (after greedy has ablated
        every candidate, many later ones are silent). The batch starts where its first
        row parts from the reference (clean by default; module docstring). share=False
        runs every row through every block at every position."""
        reference = reference or cache.clean
        # a sliding window's cache has dropped the earliest positions: start from position 0
        shared = share and reference.kv.whole
        begin = int(self.starts(cache, features, masks, reference).min()) if shared else 0
        kv = reference.kv.head(begin)
        ids, latents = cache.input_ids[:, begin:], cache.latents[begin:]
        h = cache.hidden[:, begin:]  # one state, the clean prompt; state[r]: row r's state in h
        state = torch.zeros(len(masks), dtype=torch.long, device=masks.device)
        own = torch.arange(len(masks), device=masks.device)[:, None]  # share=False: one each
        edited = masks.clone()  # masks less the latents silent where they would be edited
        layers = sorted(self.saes)
        for layer, stop in zip(layers, [*layers[1:], self.lm.n_layers - 1]):
            cols = [i for i, f in enumerate(features) if f.layer == layer]
            if share and self.intervention.silent_is_identity:
                active = self._active(latents, ids, [features[i] for i in cols], layer, h)
                edited[:, cols] = masks[:, cols] * active[state]
            key = torch.cat([state[:, None], edited[:, cols].long(), *([] if share else [own])], 1)
            state, first = _unique_rows(key)
            parent = key[first, 0]  # the state each new one branches from
            if not torch.equal(parent, torch.arange(len(h), device=h.device)):
                h = h[parent]
                kv.batch_select_indices(parent)
            edit = self.edit(features, edited[first], ids, latents)
            h = self.lm.run_blocks(edit(layer, h), layer + 1, stop + 1, cache=kv, past=begin)
        # no edit reaches the blocks below the first SAE layer: clean at every position
        kv.extend(cache.clean.kv, range(self.start + 1), begin, rows=len(h))
        # the reply's tokens are edited with each row's own mask (a latent silent on the
        # prompt may fire on them): rows sharing a state part once their opening starts
        return self._opening_scores(h[:, -1], features, masks, kv, state).cpu()

    def _active(
        self,
        latents: torch.Tensor,
        ids: torch.Tensor,
        features: list[Feature],
        layer: int,
        h: torch.Tensor,
    ) -> torch.Tensor:
        """Which of `features` (all at `layer`) fire at some position the edit touches, in
        each state of h (S, T, d) over the tokens `ids` (1, T), whose first SAE layer's
        latents are `latents` (T, d_sae): (S, len(features)) bool."""
        idx = torch.tensor([f.latent for f in features], device=h.device, dtype=torch.long)
        if layer == self.start:  # no mask changes the first SAE layer's latents
            acts = latents[None, :, idx]
        else:
            acts = latent_acts(self.saes[layer], h, idx)
        spared = self.spared(ids)
        fires = acts > 0
        if spared is not None:
            fires = fires & ~spared[..., None]
        return fires.any(1)

    def _opening_scores(
        self,
        last: torch.Tensor,
        features: list[Feature],
        masks: torch.Tensor,
        kv: KVCache,
        state: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Opening scores of the rows of `masks`, from the final residuals `last` (S, d) of
        the prompt states whose keys and values `kv` holds (row r's is state[r]; by default
        one each), decoding greedy tokens under each row's mask (judge.Openings: where the
        trie does not branch, several tokens in one pass)."""
        past = kv.get_seq_length()
        of_row = torch.arange(len(masks), device=last.device) if state is None else state

        def next_logits(keep: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            nonlocal masks, past, of_row
            kept = keep.nonzero().squeeze(-1)
            kv.batch_select_indices(of_row[kept])
            of_row = torch.arange(len(kept), device=kept.device)
            masks = masks[keep]
            # new tokens: their latents are not cached, and a "prompt" edit leaves them alone
            prompt_only = self.intervention.positions == "prompt"
            edit = None if prompt_only else self.edit(features, masks, tokens)
            h = self.lm.run_blocks(self.lm.embed(tokens), 0, edit=edit, cache=kv, past=past)
            past += tokens.shape[1]
            return self.lm.next_token_logits(h)

        return self.openings.score(self.lm.next_token_logits(last)[of_row], next_logits)

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
        """Every SAE's latents (T, d_sae) on this prompt, under an optional intervention mask.

        Latents at a layer are read before that layer's own edit is applied.
        """
        features = features or []
        mask = (
            torch.ones(1, len(features)) if mask is None else torch.as_tensor(mask).reshape(1, -1)
        )
        edit = self.edit(features, mask.to(self.lm.device), cache.input_ids, cache.latents)
        seen = {self.start: cache.latents}

        def record(layer: int, h: torch.Tensor) -> torch.Tensor:
            if layer in self.saes:
                seen[layer] = self.saes[layer].encode(h[0])
            return edit(layer, h)

        h = edit(self.start, cache.hidden)
        self.lm.run_blocks(h, self.start + 1, stop=max(self.saes) + 1, edit=record)
        return seen


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
        """Every SAE's latents (T', d_sae) at the T' prompt positions the intervention
        edits, under an optional mask: where a latent reads there is what ablating it can
        act on (one that fires only on a spared special token is inert, however strongly)."""
        latents = self.engine.latents(self.cache, features, mask)
        spared = self.engine.spared(self.cache.input_ids)
        if spared is None:
            return latents
        return {layer: z[~spared[0]] for layer, z in latents.items()}
