"""Many-prompt passes: the shared template opening and length-ordered batches give the
model's own full pass, edited or not."""

import torch

from refusal.forwards import hooked
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
