"""Many-prompt batched passes: first-token logits, refusal scores, residual means, and
greedy generation, each with an optional residual edit.

The engine scores many masks on one prompt; these run one edit over many prompts (the
refusal direction, capability costs, verification replies, the organism's evaluation).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast, overload

import torch
from tqdm import tqdm
from transformers import DynamicCache

from refusal.interventions import Edit, EmbedEdit, Spare, sparing
from refusal.judge import refusal_score
from refusal.models import LM, KVCache

C = TypeVar("C", bound=DynamicCache)


@dataclass
class Forwards:
    """Batched full passes of `lm` over lists of instructions."""

    lm: LM
    refusal_ids: list[int]  # single tokens whose greedy margin is the refusal score
    batch_size: int = 64

    def _batches(self, instructions: list[str]) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(0, len(instructions), self.batch_size):
            yield self.lm.tokenize(instructions[i : i + self.batch_size])

    def _rows(self, instructions: list[str]) -> Rows:
        """The instructions as a many-prompt pass runs them: the opening every one shares
        (the chat template's, with a system prompt half of a short prompt), run once, and
        the rest of each, left-padded in length-ordered batches (little padding)."""
        ids = self.lm.tokenizer(self.lm.format(instructions), add_special_tokens=False)["input_ids"]
        return self._split(ids, min(map(len, ids)) - 1, self._by_count)

    def _by_count(self, lengths: list[int]) -> list[list[int]]:
        """Row indices by length, in batches of batch_size."""
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _split(
        self, ids: list[list[int]], most: int, batches: Callable[[list[int]], list[list[int]]]
    ) -> Rows:
        """Token rows as Rows: the opening they all share (at most `most` tokens), and the
        rest of each, left-padded, in the batches of row indices `batches` makes of the
        rests' lengths."""
        shared = min(_common_prefix(ids), most)
        # a row's padding then sits between the opening and the rest: a sliding window
        # shorter than the rows would count it as tokens (Gemma-2's is 4096)
        window = getattr(self.lm.model.config, "sliding_window", None)
        if window and max(map(len, ids)) > window:
            shared = 0
        rests = [row[shared:] for row in ids]
        padded = [
            (idx, *self._left_padded([rests[i] for i in idx]))
            for idx in batches([len(r) for r in rests])
        ]
        return Rows(ids[0][:shared], padded)

    def _opening(
        self,
        rows: Rows,
        edit: Edit | None = None,
        embed_edit: EmbedEdit | None = None,
        spare: Spare | None = None,
    ) -> KVCache | None:
        """Keys and values of the shared opening, edited as each row's would be."""
        if not rows.shared:
            return None
        prefix = KVCache()
        self._pass(torch.tensor([rows.shared]), None, edit, embed_edit, spare, prefix)
        return prefix

    @torch.no_grad()
    def first_token_logits(
        self,
        instructions: list[str],
        edit: Edit | None = None,
        embed_edit: EmbedEdit | None = None,
        spare: Spare | None = None,
    ) -> torch.Tensor:
        """Next-token logits (N, vocab) at the reply's start, with an optional residual edit
        (left out at the positions `spare` names, e.g. the engine's special tokens).

        The shared opening runs once and every row continues from its keys and values
        (`_rows`). Edits act position by position, so this is the full pass, computed once
        where it is shared.
        """
        rows = self._rows(instructions)
        prefix = self._opening(rows, edit, embed_edit, spare)
        out: list[torch.Tensor] = [torch.empty(0)] * len(instructions)
        for idx, ids, mask in rows.batches:
            cache = _repeated(prefix, len(idx))
            h = self._pass(ids, mask, edit, embed_edit, spare, cache, len(rows.shared))
            self._next_logits(h, idx, out)
        return torch.stack(out)

    def _next_logits(self, hidden: torch.Tensor, idx: list[int], out: list[torch.Tensor]) -> None:
        """Each row's next-token logits from its final residual, into out[idx[row]]."""
        for i, logits in zip(idx, self.lm.next_token_logits(hidden[:, -1]).float().cpu()):
            out[i] = logits

    @torch.no_grad()
    def checkpoint(self, instructions: list[str]) -> Checkpoint:
        """A clean pass over `instructions` that keeps every block's output, so that an
        edit of the blocks from some layer on runs from there (Checkpoint)."""
        rows = self._rows(instructions)
        prefix = self._opening(rows)
        outputs: list[list[torch.Tensor]] = []

        def keep(layer: int, h: torch.Tensor) -> torch.Tensor:
            outputs[-1].append(h)
            return h

        for _, ids, mask in rows.batches:
            outputs.append([])
            self._pass(ids, mask, keep, None, None, _repeated(prefix, len(ids)), len(rows.shared))
        return Checkpoint(self, rows, outputs)

    def _left_padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, attention mask) of token rows, left-padded to the longest."""
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.lm.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, width - len(row) :] = torch.tensor(row)
            mask[r, width - len(row) :] = 1
        return ids, mask

    def _pass(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        edit: Edit | None,
        embed_edit: EmbedEdit | None,
        spare: Spare | None,
        cache: KVCache | None,
        past: int = 0,
    ) -> torch.Tensor:
        """The final residual of `input_ids`, continuing the `past` tokens `cache` holds."""
        device = self.lm.device
        input_ids = input_ids.to(device)
        h = self.lm.embed(input_ids)
        h = embed_edit(h) if embed_edit else h
        return self.lm.run_blocks(
            h,
            0,
            attention_mask=None if attention_mask is None else attention_mask.to(device),
            edit=_on(edit, spare, input_ids),
            cache=cache,
            past=past,
        )

    def refusal_scores(
        self,
        instructions: list[str],
        edit: Edit | None = None,
        embed_edit: EmbedEdit | None = None,
    ) -> torch.Tensor:
        """First-token refusal score of each instruction (judge.refusal_score)."""
        return refusal_score(
            self.first_token_logits(instructions, edit, embed_edit), self.refusal_ids
        )

    @torch.no_grad()
    def residual_means(self, instructions: list[str], positions: list[int]) -> torch.Tensor:
        """Mean residual (n_layers, len(positions), d) at the given (negative) token positions."""
        lm = self.lm
        total = torch.zeros(lm.n_layers, len(positions), lm.d_model, dtype=torch.float64)
        pos = torch.tensor(positions)

        def record(layer: int, h: torch.Tensor) -> torch.Tensor:
            total[layer] += h[:, pos].double().sum(0).cpu()
            return h

        for batch in self._batches(instructions):
            h = lm.embed(batch["input_ids"])
            lm.run_blocks(h, 0, attention_mask=batch["attention_mask"], edit=record)
        return (total / len(instructions)).float()

    @torch.no_grad()
    def residuals(
        self, texts: list[str], layers: list[int], batch_size: int = 16
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]]:
        """Texts already formatted (a prompt with its reply, say), right-padded in batches
        and run clean up to the last of `layers`: each batch's ids, attention mask and
        residual (B, T, d) at each of the layers."""
        lm, tokenizer = self.lm, self.lm.tokenizer
        seen: dict[int, torch.Tensor] = {}

        def record(layer: int, h: torch.Tensor) -> torch.Tensor:
            if layer in layers:
                seen[layer] = h
            return h

        for i in range(0, len(texts), batch_size):
            tokenizer.padding_side = "right"
            batch = tokenizer(
                texts[i : i + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            ids, mask = batch["input_ids"], batch["attention_mask"]
            h = lm.embed(ids.to(lm.device))
            stop = max(layers) + 1
            lm.run_blocks(h, 0, stop=stop, attention_mask=mask.to(lm.device), edit=record)
            yield ids, mask, dict(seen)

    @torch.no_grad()
    def generate(
        self,
        instructions: list[str],
        edit: Edit | None = None,
        layers: Iterable[int] | None = None,
        embed_edit: EmbedEdit | None = None,
        prompt_only: bool = False,
        max_new_tokens: int = 48,
        desc: str | None = None,
        spare: Spare | None = None,
    ) -> list[str]:
        """Greedy replies, batched with left padding, prompts sorted by length (little
        padding); `edit` applied at `layers` (all by default), see `hooked`. Without an edit
        the opening every prompt shares runs once (`_rows`), as in the other passes."""
        if not instructions:  # a resumed stage may have none left
            return []
        # an edit may be built for the whole batch in this order (per-row masks): its
        # rows run whole, the opening included
        rows = self._rows(instructions) if edit is None and embed_edit is None else None
        batches = rows.batches if rows else self._by_length(instructions)
        shared = rows.shared if rows else []
        prefix = self._prefilled(shared)
        replies = [""] * len(instructions)
        for idx, ids, mask in tqdm(
            batches, desc=desc, unit="batch", disable=desc is None, leave=False
        ):
            cache = self._fresh_cache() if prefix is None else _repeated(prefix, len(idx))
            with hooked(self.lm, edit, layers, embed_edit, prompt_only, spare) as live:
                tokens = self._greedy(ids, len(shared), mask, cache, max_new_tokens, live)
            texts = self.lm.tokenizer.batch_decode(tokens, skip_special_tokens=True)
            for i, text in zip(idx, texts):
                replies[i] = text
        return replies

    def _by_length(
        self, instructions: list[str]
    ) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Whole prompts in batches of batch_size, ordered by length, left-padded."""
        order = sorted(range(len(instructions)), key=lambda i: len(instructions[i]))
        batches = []
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            tokens = self.lm.tokenize([instructions[i] for i in idx])
            batches.append((idx, tokens["input_ids"], tokens["attention_mask"]))
        return batches

    def _fresh_cache(self) -> DynamicCache:
        return DynamicCache(config=self.lm.model.config)

    def _prefilled(self, shared: list[int]) -> DynamicCache | None:
        """Keys and values of the clean opening `shared` (None if empty), through the
        model's own forward, which generation continues."""
        if not shared:
            return None
        cache = self._fresh_cache()
        ids = torch.tensor([shared], device=self.lm.device)
        self.lm.step(ids, torch.ones_like(ids), cache)
        return cache

    def _greedy(
        self,
        ids: torch.Tensor,
        past: int,
        mask: torch.Tensor,
        cache: DynamicCache,
        max_new_tokens: int,
        rows: LiveRows,
    ) -> list[list[int]]:
        """Each row's greedy tokens up to its end of turn (included), continuing the `past`
        tokens `cache` holds for every row. A row that ends leaves the batch: HF generate
        keeps it to the longest reply's end, and in the 100-prompt run's verification 62 %
        of its row-steps were such finished rows."""
        lm = self.lm
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        mask = torch.cat([mask.new_ones(len(mask), past), mask], -1)
        ends = torch.tensor(lm.end_of_turn_ids, device=lm.device)
        tokens: list[list[int]] = [[] for _ in range(len(ids))]
        live = torch.arange(len(ids), device=lm.device)
        for _ in range(max_new_tokens):
            ids = lm.step(ids, mask, cache).argmax(-1)
            for row, token in zip(live.tolist(), ids.tolist()):
                tokens[row].append(token)
            going = ~torch.isin(ids, ends)
            if not going.any():
                break
            if not going.all():
                keep = going.nonzero()[:, 0]
                cache.batch_select_indices(keep)
                ids, mask, live = ids[keep], mask[keep], live[keep]
                rows.live = live
            ids, mask = ids[:, None], torch.cat([mask, mask.new_ones(len(mask), 1)], -1)
        return tokens

    @torch.no_grad()
    def read(
        self,
        instructions: list[str],
        replies: list[str],
        max_tokens: int = 128,
        edit: Edit | None = None,
        embed_edit: EmbedEdit | None = None,
        spare: Spare | None = None,
    ) -> list[Reading]:
        """Each reply (its first `max_tokens` tokens) teacher-forced after its
        chat-formatted instruction, with an optional edit (left out at the positions
        `spare` names): its mean log-probability per token, and the next-token logits at
        its start, which first_token_logits gives for the same edit.

        As there, the opening every row shares runs once (the chat template's; the whole
        prompt where every reply follows the same request, as PMI's do); the rest goes in
        length-ordered batches of at most TOKEN_BUDGET padded tokens, unembedded only
        where a reply token is predicted (a 49k-word vocabulary costs a fifth of a small
        model's FLOPs per position)."""
        tokenizer = self.lm.tokenizer
        prompts = tokenizer(self.lm.format(instructions), add_special_tokens=False)["input_ids"]
        answers = [
            a[:max_tokens] for a in tokenizer(replies, add_special_tokens=False)["input_ids"]
        ]
        ids = [p + a for p, a in zip(prompts, answers)]
        # every row keeps its prompt's last token, where its reply's first is predicted
        rows = self._split(
            ids, min(map(len, prompts)) - 1, lambda n: list(token_batches(n, TOKEN_BUDGET))
        )
        prefix = self._opening(rows, edit, embed_edit, spare)
        out: list[Reading | None] = [None] * len(ids)
        for idx, batch, mask in rows.batches:
            cache = _repeated(prefix, len(idx))
            h = self._pass(batch, mask, edit, embed_edit, spare, cache, len(rows.shared))
            for i, reading in zip(idx, self._readings(h, [answers[i] for i in idx])):
                out[i] = reading
        return cast(list[Reading], out)

    def _readings(self, hidden: torch.Tensor, answers: list[list[int]]) -> list[Reading]:
        """Readings of left-padded rows (B, W, d) that end with their `answers`."""
        width = hidden.shape[1]
        # row r's positions from its prompt's last token to its reply's last but one
        at = [
            r * width + torch.arange(width - 1 - len(a), width - 1 + (not a))
            for r, a in enumerate(answers)
        ]
        logits = self.lm.next_token_logits(
            hidden.flatten(0, 1)[torch.cat(at).to(hidden.device)]
        ).float()
        readings = []
        for rows, answer in zip(logits.split([len(a) or 1 for a in answers]), answers):
            target = torch.tensor(answer, dtype=torch.long, device=rows.device)
            logp = -torch.nn.functional.cross_entropy(rows[: len(answer)], target, reduction="none")
            # a copy: a view would keep the whole batch's logits alive with the reading
            first = rows[0].clone().cpu()
            readings.append(Reading(logp.mean().item() if answer else 0.0, first))
        return readings


@dataclass
class Reading:
    """A reply teacher-forced after its prompt (Forwards.read)."""

    logprob: float  # mean log-probability per reply token; 0.0 for an empty reply
    first: torch.Tensor  # next-token logits (vocab,) where the reply starts


@dataclass
class Rows:
    """Instructions tokenized for a many-prompt pass (Forwards._rows)."""

    shared: list[int]  # the opening every row shares, run once
    # (row indices, input ids (B, S), attention mask (B, S)): the rest, left-padded
    batches: list[tuple[list[int], torch.Tensor, torch.Tensor]]


@dataclass
class Checkpoint:
    """A clean many-prompt pass that kept every block's output (Forwards.checkpoint). An
    edit that leaves the blocks before `layer` alone (the refusal direction added at
    `layer`, say) then runs from `layer` on: below it every row is the clean pass's, and
    only the shared opening, one row, runs again from the embeddings."""

    forwards: Forwards
    rows: Rows
    outputs: list[list[torch.Tensor]]  # per batch, per layer: the block's output (B, S, d)

    @torch.no_grad()
    def first_token_logits(self, layer: int, edit: Edit) -> torch.Tensor:
        """Forwards.first_token_logits with `edit`, which must be the identity on the
        outputs of the blocks before `layer`."""
        fw, past = self.forwards, len(self.rows.shared)
        prefix = fw._opening(self.rows, edit)
        out: list[torch.Tensor] = [torch.empty(0)] * sum(len(b[0]) for b in self.rows.batches)
        for (idx, _, mask), kept in zip(self.rows.batches, self.outputs):
            h = fw.lm.run_blocks(
                edit(layer, kept[layer]),
                layer + 1,
                attention_mask=mask.to(fw.lm.device),
                edit=edit,
                cache=_repeated(prefix, len(idx)),
                past=past,
            )
            fw._next_logits(h, idx, out)
        return torch.stack(out)


@overload
def _repeated(prefix: None, rows: int) -> None: ...
@overload
def _repeated(prefix: C, rows: int) -> C: ...
def _repeated(prefix: C | None, rows: int) -> C | None:
    """A copy of the opening's keys and values for a batch of `rows` rows."""
    if prefix is None:
        return None
    cache = copy.deepcopy(prefix)
    cache.batch_repeat_interleave(rows)
    return cache


def _common_prefix(rows: list[list[int]]) -> int:
    """How many leading tokens every row shares."""
    first = rows[0]
    return next(
        (i for i in range(len(first)) if any(len(r) <= i or r[i] != first[i] for r in rows)),
        len(first),
    )


def _on(edit: Edit | None, spare: Spare | None, ids: torch.Tensor) -> Edit | None:
    """`edit` over the tokens `ids`, the positions `spare` names left alone."""
    return edit if edit is None or spare is None else sparing(edit, spare(ids))


@dataclass
class LiveRows:
    """The rows of a batch still generating, for edits built for the whole batch: `live`
    indexes them (None while every row is), `size` is the batch's size."""

    size: int = 0
    live: torch.Tensor | None = None

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """Live rows' `x` placed at their rows of the whole batch, finished rows zero."""
        if self.live is None:
            return x
        out = x.new_zeros((self.size, *x.shape[1:]))
        out[self.live] = x
        return out

    def part(self, x: torch.Tensor) -> torch.Tensor:
        """The live rows of a whole batch's `x`."""
        return x if self.live is None else x[self.live]


@contextmanager
def hooked(
    lm: LM,
    edit: Edit | None,
    layers: Iterable[int] | None = None,
    embed_edit: EmbedEdit | None = None,
    prompt_only: bool = False,
    spare: Spare | None = None,
) -> Iterator[LiveRows]:
    """Apply `edit` to the output of blocks `layers` (all by default), and `embed_edit` to
    the embeddings, inside the model's own forward through forward hooks: on every
    position, or on the prompt alone (prompt_only); `edit` is left out at the positions
    `spare` names in each forward's tokens.

    With KV caching the first forward is the prompt; later ones are generated tokens. A
    decoder that drops finished rows says which remain in the yielded `LiveRows`: the edit,
    built for the whole batch (per-row masks), still sees it, finished rows as zeros.
    """
    rows = LiveRows()
    if edit is None and embed_edit is None:
        yield rows
        return
    state: dict[str, Any] = {"prefill": True, "edit": edit}

    def live() -> bool:
        return state["prefill"] or not prompt_only

    def tokens(module, args) -> None:  # each forward's input ids: the prompt, then new tokens
        if state["prefill"]:
            rows.size = len(args[0])
        state["edit"] = _on(edit, spare, rows.whole(args[0]))

    def block_hook(layer: int):
        def apply(module, args, output):
            if edit is None or not live():
                return output
            return rows.part(state["edit"](layer, rows.whole(output)))

        return apply

    layers = range(lm.n_layers) if layers is None else layers
    handles = [lm.blocks[layer].register_forward_hook(block_hook(layer)) for layer in layers]
    embeddings = lm.model.get_input_embeddings()
    handles.append(embeddings.register_forward_pre_hook(tokens))
    if embed_edit is not None:
        handles.append(
            embeddings.register_forward_hook(
                lambda m, a, out: rows.part(embed_edit(rows.whole(out))) if live() else out
            )
        )
    handles.append(
        lm.blocks[lm.n_layers - 1].register_forward_hook(lambda *_: state.update(prefill=False))
    )
    try:
        yield rows
    finally:
        for handle in handles:
            handle.remove()


# Padded tokens a teacher-forced batch may hold: rows of very different lengths in one
# batch of 64 ran mostly padding; on 2 CPU cores this budget and the unembedding at reply
# positions alone ran the judge's PMI passes 2.7x faster (docs/measurements.md).
TOKEN_BUDGET = 1024


def token_batches(lengths: list[int], budget: int) -> Iterator[list[int]]:
    """Indices of the non-empty rows (length > 0), shortest first, in batches whose padded
    size (rows x longest) stays within `budget` (a longer row goes alone)."""
    batch: list[int] = []
    for i in sorted((i for i, n in enumerate(lengths) if n), key=lengths.__getitem__):
        if batch and lengths[i] * (len(batch) + 1) > budget:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch
