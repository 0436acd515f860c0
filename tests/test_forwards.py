"""Many-prompt passes: the shared template opening and length-ordered batches give the
model's own full pass, edited or not."""

import pytest
import torch

from refusal.forwards import hooked, token_batches
from refusal.interventions import direction_ablation, direction_addition
from tests.conftest import tiny_forwards

PROMPTS = [
    "Write a haiku about rain.",
    "How do I sort a list in Python, keeping equal items in their order?",
    "Hi",
    "Summarise the plot of a novel about a lighthouse keeper who finds a map.",
]


def reference(lm, prompts, edit=None, embed_edit=None, spare=None) -> torch.Tensor:
    """Each prompt alone, through HF's forward with the edit hooked in."""
    rows = []
    for prompt in prompts:
        batch = lm.tokenize([prompt])
        with hooked(lm, edit, embed_edit=embed_edit, spare=spare), torch.no_grad():
            rows.append(lm.model(**batch).logits[0, -1].float())
    return torch.stack(rows)


def test_first_token_logits_equal_the_full_pass(tiny_lm):
    forwards = tiny_forwards(tiny_lm, batch_size=3)  # two batches, one of them padded
    torch.testing.assert_close(
        forwards.first_token_logits(PROMPTS), reference(tiny_lm, PROMPTS), rtol=1e-4, atol=1e-4
    )


def test_edits_reach_the_shared_opening_and_every_row(tiny_lm):
    """The direction ablated everywhere (embeddings too), or added at one layer, with
    special tokens spared: the opening, run once, is edited as each row's would be."""
    forwards = tiny_forwards(tiny_lm, batch_size=3)
    r = torch.randn(tiny_lm.d_model, generator=torch.Generator().manual_seed(0))
    spare = tiny_lm.is_special
    edit, embed_edit = direction_ablation(r)
    for args in [(edit, embed_edit, None), (direction_addition(3 * r, 1), None, spare)]:
        expected = reference(tiny_lm, PROMPTS, *args)
        assert not torch.allclose(expected, reference(tiny_lm, PROMPTS), atol=1e-3)
        torch.testing.assert_close(
            forwards.first_token_logits(PROMPTS, *args), expected, rtol=1e-4, atol=1e-4
        )


def test_a_sliding_window_wider_than_the_rows_shares_the_opening(tiny_gemma2, monkeypatch):
    """Gemma-2's sliding window (tiny: 8 tokens) would count padding placed after the shared
    opening, so it is shared only where the window spans the rows (Gemma-2's: 4096)."""
    forwards = tiny_forwards(tiny_gemma2, batch_size=3)
    for window in (8, 64):
        monkeypatch.setattr(tiny_gemma2.model.config, "sliding_window", window)
        torch.testing.assert_close(
            forwards.first_token_logits(PROMPTS),
            reference(tiny_gemma2, PROMPTS),
            rtol=1e-4,
            atol=1e-4,
        )


def test_a_checkpoint_runs_an_edit_from_its_layer_as_the_full_pass_does(tiny_lm):
    """The direction added at one layer, run from that layer on the kept clean outputs,
    gives the logits of the full edited pass; and it moves them (the edit is not lost)."""
    forwards = tiny_forwards(tiny_lm, batch_size=3)
    checkpoint = forwards.checkpoint(PROMPTS)
    r = torch.randn(tiny_lm.d_model, generator=torch.Generator().manual_seed(1))
    clean = forwards.first_token_logits(PROMPTS)
    for layer in range(tiny_lm.n_layers):
        edit = direction_addition(3 * r, layer)
        expected = forwards.first_token_logits(PROMPTS, edit)
        assert not torch.allclose(expected, clean, atol=1e-3)
        torch.testing.assert_close(
            checkpoint.first_token_logits(layer, edit), expected, rtol=1e-4, atol=1e-4
        )


def test_teacher_forced_batches_stay_within_their_token_budget():
    lengths = [30, 0, 200, 5, 40, 41, 90, 0, 12]
    batches = list(token_batches(lengths, 100))
    assert sorted(i for b in batches for i in b) == [0, 2, 3, 4, 5, 6, 8]  # empty rows skipped
    for batch in batches:
        width = max(lengths[i] for i in batch)
        assert len(batch) == 1 or width * len(batch) <= 100  # a longer row goes alone
        assert [lengths[i] for i in batch] == sorted(lengths[i] for i in batch)
    assert [2] in batches and [6] in batches  # 200 and 90: no room for another row


def test_an_edited_teacher_forced_pass_equals_the_hooked_full_pass(tiny_lm):
    """Reply log-probabilities under an edit, batched by token budget, equal each reply's
    own hooked forward (the unembedding read only at reply positions)."""
    forwards = tiny_forwards(tiny_lm)
    edit, embed_edit = direction_ablation(torch.randn(tiny_lm.d_model))
    replies = ["Rain falls on the roof", "Use sorted() with a key", "", "A keeper climbs"]
    got = [r.logprob for r in forwards.read(PROMPTS, replies, edit=edit, embed_edit=embed_edit)]
    tok = tiny_lm.tokenizer
    for prompt, reply, value in zip(PROMPTS, replies, got):
        ids = tok(tiny_lm.format([prompt]), add_special_tokens=False)["input_ids"][0]
        answer = tok(reply, add_special_tokens=False)["input_ids"]
        if not answer:
            assert value == 0.0
            continue
        with hooked(tiny_lm, edit, embed_edit=embed_edit), torch.no_grad():
            logp = tiny_lm.model(input_ids=torch.tensor([ids + answer])).logits[0].log_softmax(-1)
        steps = [logp[len(ids) - 1 + k, t].item() for k, t in enumerate(answer)]
        assert abs(value - sum(steps) / len(steps)) < 1e-4


def test_a_reading_starts_with_the_first_token_logits_of_the_same_edit(tiny_lm):
    """`read` gives, beside each reply's log-probability, the logits first_token_logits
    gives at the reply's start, with the special tokens spared; where every reply follows
    the same request (PMI's unrelated requests) the whole prompt is shared and each row
    still reads its own reply."""
    forwards = tiny_forwards(tiny_lm)
    edit, _ = direction_ablation(torch.randn(tiny_lm.d_model))
    spare = tiny_lm.is_special
    replies = ["Rain falls", "", "Use sorted() with a key, which is stable", "A keeper"]
    readings = forwards.read(PROMPTS, replies, edit=edit, spare=spare)
    torch.testing.assert_close(
        torch.stack([r.first for r in readings]),
        forwards.first_token_logits(PROMPTS, edit, spare=spare),
        rtol=1e-4,
        atol=1e-4,
    )
    # each holds its own logits, not a view keeping its batch's alive
    assert all(r.first.untyped_storage().nbytes() == r.first.nbytes for r in readings)
    same = [PROMPTS[1]] * len(replies)
    shared = [r.logprob for r in forwards.read(same, replies)]
    alone = [forwards.read([p], [r])[0].logprob for p, r in zip(same, replies)]
    assert shared == pytest.approx(alone, abs=1e-4)
    assert shared[1] == 0.0 and len(set(shared)) == len(shared)


def test_rows_that_end_leave_the_batch_and_the_rest_keep_their_own_edit(tiny_lm, monkeypatch):
    """Greedy replies of a batch whose rows end at different steps, each row under its
    own edit, equal HF generate's for each prompt alone: rows dropped as they end leave
    the others' tokens, positions and edits as they were."""
    forwards = tiny_forwards(tiny_lm)
    push = torch.randn(len(PROMPTS), tiny_lm.d_model, generator=torch.Generator().manual_seed(2))

    def edit_of(rows: torch.Tensor):
        return lambda layer, h: h + 2 * rows[:, None] if layer == 1 else h

    def alone(prompt: str, row: torch.Tensor) -> list[int]:
        batch = tiny_lm.tokenize([prompt])
        with hooked(tiny_lm, edit_of(row[None])), torch.no_grad():
            out = tiny_lm.generator.generate(
                **batch, max_new_tokens=8, do_sample=False, eos_token_id=tiny_lm.end_of_turn_ids
            )
        return out[0, batch["input_ids"].shape[1] :].tolist()

    # end the turn on tokens two of the replies write early
    free = [alone(p, row) for p, row in zip(PROMPTS, push)]
    monkeypatch.setattr(tiny_lm.model.generation_config, "eos_token_id", [free[0][1], free[2][3]])
    expected = [alone(p, row) for p, row in zip(PROMPTS, push)]
    lengths = [
        next((k + 1 for k, t in enumerate(e) if t in tiny_lm.end_of_turn_ids), 8) for e in expected
    ]
    assert min(lengths) < max(lengths)  # rows end at different steps
    # generate orders prompts by length: the edit's rows follow that order
    order = sorted(range(len(PROMPTS)), key=lambda i: len(PROMPTS[i]))
    got = forwards.generate(PROMPTS, edit_of(push[order]), max_new_tokens=8)
    texts = [tiny_lm.tokenizer.decode(e, skip_special_tokens=True) for e in expected]
    assert got == texts


def test_clean_replies_continue_the_shared_opening(tiny_lm, monkeypatch):
    """Without an edit the template's opening runs once and every row continues from its
    keys and values: each reply equals HF generate's for its prompt alone."""
    lm = tiny_lm
    if getattr(lm.model.config, "sliding_window", None):  # tiny Gemma-2's spans 8 tokens
        monkeypatch.setattr(lm.model.config, "sliding_window", 128)
    forwards = tiny_forwards(lm, batch_size=3)  # two batches, one of them padded

    def alone(prompt: str) -> str:
        batch = lm.tokenize([prompt])
        with torch.no_grad():
            out = lm.generator.generate(
                **batch, max_new_tokens=8, do_sample=False, eos_token_id=lm.end_of_turn_ids
            )
        return lm.tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    assert forwards._rows(PROMPTS).shared  # the path under test
    assert forwards.generate(PROMPTS, max_new_tokens=8) == [alone(p) for p in PROMPTS]
    assert forwards.generate([]) == []  # a resumed stage may have no prompt left
