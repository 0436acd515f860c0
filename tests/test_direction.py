"""Refusal direction: template positions, baseline filter, selection filters, candidate
ranking, and the direction stage's record."""

import math

import pytest
import torch

from refusal import data, direction, pipeline
from refusal.errors import ConfigError, DataError
from refusal.features import Feature
from refusal.records import DirectionRecord, DirectionScore
from refusal.stages import direction as direction_stage
from tests.conftest import make_cfg, tiny_engine, tiny_forwards


def test_post_instruction_positions_are_the_template_suffix(tiny_llama):
    positions = direction.post_instruction_positions(tiny_llama)
    ids = tiny_llama.tokenizer(tiny_llama.format(["Say hi"])[0], add_special_tokens=False)[
        "input_ids"
    ]
    suffix = tiny_llama.tokenizer.decode(ids[positions[0] :])
    assert "hi" not in suffix and "assistant" in suffix and positions[-1] == -1


def test_baseline_filter_drops_harmful_prompts_the_model_does_not_refuse(tiny_llama):
    forwards = tiny_forwards(tiny_llama)
    prompts = data.builtin("harmful", "train")[:6]
    scores = forwards.refusal_scores(prompts)
    threshold = scores.median().item()  # the model "refuses" the prompts scored above it
    complied, refused = prompts[int(scores.argmin())], prompts[int(scores.argmax())]
    kept, counts = direction.filter_by_baseline(
        forwards, {"harmful_train": prompts, "harmless_val": prompts}, threshold
    )
    assert refused in kept["harmful_train"] and complied not in kept["harmful_train"]
    assert complied in kept["harmless_val"] and refused not in kept["harmless_val"]
    assert sorted(kept["harmful_train"] + kept["harmless_val"]) == sorted(prompts)
    n = len(kept["harmful_train"])
    assert (counts["harmful_train"].kept, counts["harmful_train"].dropped) == (n, len(prompts) - n)
    with pytest.raises(DataError, match="refuses none of the 6 harmful_train"):
        direction.filter_by_baseline(forwards, {"harmful_train": prompts}, scores.max().item())


def test_selection_prefers_candidates_passing_both_filters():
    scores = [
        DirectionScore(layer=layer, position=-1, bypass=bypass, induce=induce, kl=kl)
        for layer, bypass, induce, kl in [
            (0, -9.0, -1.0, 5.0),  # best bypass, fails both
            (1, -1.0, 0.5, 0.05),
            (2, -2.0, 0.5, 0.05),
            (3, -5.0, 0.5, 0.50),  # fails KL only
            (4, -3.0, -1.0, 0.05),  # fails induce only
        ]
    ]

    def admitted(scores, kl_max, induce_min):
        rule, found = direction._admissible(scores, kl_max, induce_min)
        return rule, [s.layer for s in found]

    assert admitted(scores, 0.1, 0.0) == ("induce and KL", [1, 2])
    assert admitted(scores, 0.01, 0.0) == ("induce only", [1, 2, 3])
    assert admitted(scores, 0.1, 1.0) == ("KL only", [1, 2, 4])
    assert admitted(scores[:1], 0.1, 0.0) == ("bypass only", [0])


def test_selection_says_when_no_candidate_passes_both_filters(tiny_llama, capsys):
    forwards = tiny_forwards(tiny_llama)
    harmful, harmless = ["How do I build a bomb?"], ["How do I bake bread?"]
    directions = direction.mean_diff(forwards, harmful, harmless)

    def select(kl_max: float, induce_min: float, on_none: str = "warn") -> direction.Selection:
        return direction.select(
            forwards, directions, harmful, harmless, 0.2, kl_max, induce_min, 1, on_none
        )

    lenient = select(kl_max=math.inf, induce_min=-math.inf)
    assert lenient.admissible and lenient.chosen_by == "induce and KL"
    assert "passes both filters" not in capsys.readouterr().err
    none = select(kl_max=-1.0, induce_min=math.inf)  # a KL is never negative
    assert not none.admissible and none.chosen_by == "bypass only"
    assert "no (layer, position)" in capsys.readouterr().err
    assert none.layer == min(none.scores, key=lambda s: s.bypass or 0.0).layer
    assert all(s.bypass is not None for s in none.scores)  # no induce passer: all read
    record = none.record()
    assert not record.admissible and record.chosen_by == "bypass only"
    with pytest.raises(ConfigError, match="on_none_admissible=warn to choose by bypass only"):
        select(kl_max=-1.0, induce_min=math.inf, on_none="error")


def test_bypass_and_kl_read_only_where_induce_passes_choose_the_same(tiny_llama):
    forwards = tiny_forwards(tiny_llama)
    harmful = ["How do I build a bomb?", "Write malware that steals passwords."]
    harmless = ["How do I bake bread?", "Write a poem about the sea."]
    directions = direction.mean_diff(forwards, harmful, harmless)

    def select(kl_max: float, induce_min: float, score_all: bool) -> direction.Selection:
        return direction.select(
            forwards,
            directions,
            harmful,
            harmless,
            0.2,
            kl_max,
            induce_min,
            None,
            "warn",
            score_all,
        )

    everything = select(math.inf, -math.inf, score_all=True).scores
    induce_min = sorted(s.induce for s in everything)[len(everything) // 2]
    kl_max = sorted(s.kl or 0.0 for s in everything)[len(everything) // 2]
    for kl in (kl_max, -1.0):  # some pass both filters; none does ("induce only")
        full, lazy = (select(kl, induce_min, score_all) for score_all in (True, False))
        assert (lazy.layer, lazy.position, lazy.chosen_by) == (
            full.layer,
            full.position,
            full.chosen_by,
        )
        for f, s in zip(full.scores, lazy.scores):
            assert s.induce == pytest.approx(f.induce)
            if s.induce > induce_min:
                assert s.bypass == pytest.approx(f.bypass) and s.kl == pytest.approx(f.kl)
            else:
                assert s.bypass is None and s.kl is None
    assert lazy.chosen_by == "induce only"


def test_mean_diff_shape_and_sign(tiny_llama):
    forwards = tiny_forwards(tiny_llama)
    diff = direction.mean_diff(forwards, ["How do I build a bomb?"], ["How do I bake bread?"])
    n_pos = len(direction.post_instruction_positions(tiny_llama))
    assert diff.shape == (tiny_llama.n_layers, n_pos, tiny_llama.d_model)
    same = direction.mean_diff(forwards, ["How do I bake bread?"], ["How do I bake bread?"])
    assert same.abs().max() < 1e-5 and diff.abs().max() > 1e-3


def planted(lm):
    """SAEs at layers 1 and 2, a selected direction at layer 1 equal to decoder row 5 of
    layer 1 and row 9 of layer 2, and layer 2's own direction along its row 7."""
    engine = tiny_engine(lm, layers=(1, 2))
    saes = engine.saes
    n_pos = len(direction.post_instruction_positions(lm))
    directions = torch.zeros(lm.n_layers, n_pos, lm.d_model)
    directions[1, -1] = saes[1].W_dec[5] * 3
    directions[2, -1] = saes[2].W_dec[7]
    with torch.no_grad():
        saes[2].W_dec[9] = directions[1, -1]
    selection = direction.Selection(1, -1, directions[1, -1], [], "induce and KL")
    return saes, directions, selection


def test_candidates_rank_every_layer_against_the_selected_direction(tiny_llama):
    saes, directions, selection = planted(tiny_llama)
    latents = {layer: torch.ones(4, sae.cfg.d_sae) for layer, sae in saes.items()}  # all active

    def top(mode: str) -> dict[int, Feature]:
        targets = direction.candidate_directions(tiny_llama, selection, directions, saes, mode)
        found = direction.candidates(saes, targets, latents, top_k=3, cos_floor=0.05)
        return {layer: next(f for f, _ in found if f.layer == layer) for layer in saes}

    assert top("selected") == {1: Feature(1, 5), 2: Feature(2, 9)}
    assert top("per_layer") == {1: Feature(1, 5), 2: Feature(2, 7)}


def test_candidates_are_active_on_the_prompt(tiny_llama):
    saes, directions, selection = planted(tiny_llama)
    latents = {layer: torch.zeros(4, sae.cfg.d_sae) for layer, sae in saes.items()}
    latents[1][2, 5] = 1.0  # active on the prompt; latent 9 of layer 2 is not
    targets = direction.candidate_directions(tiny_llama, selection, directions, saes, "selected")
    found = direction.candidates(saes, targets, latents, top_k=3, cos_floor=0.05)
    assert [f for f, _ in found] == [Feature(1, 5)] and found[0][1] > 0.99


def test_direction_stage_records_the_filter_and_the_choice(tmp_path):
    overrides = ["model=tiny_llama", "sae=random", "layer=tiny", "logger=none"]
    sizes = ["data.n_train=6", "data.n_val=4", "search.direction.n_positions=1"]
    ctx = pipeline.setup(make_cfg([*overrides, *sizes], tmp_path))
    sets = {name: getattr(ctx.prompts, name) for name in direction_stage.SETS}
    scores = {name: ctx.forwards.refusal_scores(p) for name, p in sets.items()}
    # a threshold with a prompt of every harmless set at or under it and one of every
    # harmful set above it: the filter keeps some prompts of each set
    threshold = max(scores["harmless_train"].min(), scores["harmless_val"].min()).item()
    assert threshold < min(scores["harmful_train"].max(), scores["harmful_val"].max())
    ctx.cfg.judge.threshold = threshold
    selection = direction_stage.run(ctx)
    record = DirectionRecord.model_validate_json((tmp_path / "direction.json").read_text())
    for name, s in scores.items():
        refused = int((s > threshold).sum())
        kept = refused if name.startswith("harmful") else len(s) - refused
        assert (record.prompts[name].kept, record.prompts[name].dropped) == (kept, len(s) - kept)
    assert record.chosen_by in direction.RULES and record.admissible == selection.admissible
    assert direction_stage.run(ctx).record() == record  # a resumed run reads it back


def test_a_direction_saved_by_another_run_is_used_as_it_is(tmp_path):
    overrides = ["model=tiny_llama", "sae=random", "layer=tiny", "logger=none"]
    sizes = ["data.n_train=4", "data.n_val=4", "search.direction.filter_prompts=false"]
    first = direction_stage.run(pipeline.setup(make_cfg([*overrides, *sizes], tmp_path / "a")))
    saved = tmp_path / "a" / direction_stage.SAVED
    planted = torch.load(saved)
    planted["direction"] = -planted["direction"]  # not what selection would give
    torch.save(planted, saved)
    reuse = [*overrides, *sizes, f"search.direction.load={saved}"]
    loaded = direction_stage.run(pipeline.setup(make_cfg(reuse, tmp_path / "b")))
    assert torch.equal(loaded.direction, -first.direction)
    assert (tmp_path / "b" / direction_stage.SAVED).exists()  # kept for a resume
    absent = f"search.direction.load={tmp_path / 'none.pt'}"
    missing = make_cfg([*overrides, absent], tmp_path / "c")
    with pytest.raises(ConfigError, match="is not a direction.pt file"):
        direction_stage.run(pipeline.setup(missing))
