"""Refusal direction: template positions, selection filters, candidate ranking."""

import torch

from refusal import direction
from refusal.features import Feature
from refusal.records import DirectionScore
from tests.conftest import tiny_engine, tiny_forwards


def test_post_instruction_positions_are_the_template_suffix(tiny_llama):
    positions = direction.post_instruction_positions(tiny_llama)
    ids = tiny_llama.tokenizer(tiny_llama.format(["Say hi"])[0], add_special_tokens=False)[
        "input_ids"
    ]
    suffix = tiny_llama.tokenizer.decode(ids[positions[0] :])
    assert "hi" not in suffix and "assistant" in suffix and positions[-1] == -1


def test_selection_prefers_candidates_passing_both_filters():
    scores = [
        DirectionScore(layer=layer, position=-1, bypass=bypass, induce=induce, kl=kl)
        for layer, bypass, induce, kl in [
            (0, -9.0, -1.0, 5.0),  # best bypass, fails both
            (1, -1.0, 0.5, 0.05),
            (2, -2.0, 0.5, 0.05),
            (3, -5.0, 0.5, 0.50),  # fails KL only
        ]
    ]
    assert [s.layer for s in direction._admissible(scores, 0.1, 0.0)] == [1, 2]
    assert [s.layer for s in direction._admissible(scores, 0.01, 0.0)] == [1, 2, 3]
    assert [s.layer for s in direction._admissible(scores[:1], 0.1, 0.0)] == [0]


def test_mean_diff_shape_and_sign(tiny_llama):
    forwards = tiny_forwards(tiny_llama)
    diff = direction.mean_diff(forwards, ["How do I build a bomb?"], ["How do I bake bread?"])
    n_pos = len(direction.post_instruction_positions(tiny_llama))
    assert diff.shape == (tiny_llama.n_layers, n_pos, tiny_llama.d_model)
    same = direction.mean_diff(forwards, ["How do I bake bread?"], ["How do I bake bread?"])
    assert same.abs().max() < 1e-5 and diff.abs().max() > 1e-3


def test_candidates_rank_by_cosine_and_activity(tiny_llama):
    engine = tiny_engine(tiny_llama, layers=(1, 2))
    sae = engine.saes[1]
    n_pos = len(direction.post_instruction_positions(tiny_llama))
    directions = torch.zeros(tiny_llama.n_layers, n_pos, tiny_llama.d_model)
    directions[1, -1] = sae.W_dec[5] * 3  # planted: latent 5 of layer 1 is the direction
    directions[2, -1] = engine.saes[2].W_dec[7]
    latents = {1: torch.zeros(4, sae.cfg.d_sae), 2: torch.zeros(4, sae.cfg.d_sae)}
    latents[1][2, 5] = 1.0  # active on the prompt
    found = direction.candidates(
        tiny_llama, engine.saes, directions, -1, latents, top_k=3, cos_floor=0.05
    )
    assert found == [(Feature(1, 5), found[0][1])] and found[0][1] > 0.99  # latent 7 is inactive
