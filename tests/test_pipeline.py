"""End to end on tiny_llama with random SAEs: every stage runs and writes its results."""

import json

import pytest
import torch

from refusal import pipeline
from refusal.engine import PromptProbe
from refusal.errors import ConfigError
from refusal.features import Feature
from refusal.records import PromptResult, join, parse_row
from tests.conftest import make_cfg

BASE = [
    "model=tiny_llama",
    "judge.flip_margin=0",
    "sae=random",
    "layer=tiny",
    "data.max_eval=3",
    "logger=none",
    "judge.markers=[' ']",
    "search.fm.n_masks=64",
    "search.fm.patience=5",
    "trainer.max_epochs=30",
    "search.candidates.top_k=6",
    "search.capability.n_prompts=2",
    "data.n_train=4",
    "data.n_val=2",
    # a random model's refusal scores say nothing of harm: its thresholds here would leave
    # the baseline filter no harmless (or harmful) prompt (tests/test_direction.py)
    "search.direction.filter_prompts=false",
]


def results(run_dir) -> list[PromptResult]:
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    return join([parse_row(json.loads(line)) for line in lines])


@pytest.fixture(scope="module")
def threshold(tmp_path_factory) -> float:
    """A refusal threshold between the tiny model's clean score and its all-candidates score."""
    out = tmp_path_factory.mktemp("probe")
    pipeline.run(make_cfg([*BASE, "judge.threshold=-1000", "search.batch_size=auto"], out))
    size = json.loads((out / "summary.json").read_text())["batch_size"]
    assert size & (size - 1) == 0, "auto tunes the batch size to a power of two"
    searched = [r.greedy for r in results(out) if r.greedy and r.greedy.score is not None]
    search = min(searched, key=lambda g: g.score - g.clean_score)
    assert search.score < search.clean_score, "no candidate set lowers the score"
    return (search.clean_score + search.score) / 2


@pytest.mark.slow
def test_every_stage_runs_end_to_end(tmp_path, threshold):
    cfg = make_cfg([*BASE, f"judge.threshold={threshold}"], tmp_path)
    pipeline.run(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "n_eval",
        "n_refused",
        "n_flipped_verified",
        "flip_rate",
        "minimal_set_sizes",
        "all_minimal_verified",
        "fm_heldout_auc",
        "harmless_kl",
        "n_dormant",
        "batch_size",
        "wall_seconds",
        "seed",
        "versions",
    ):
        assert key in summary
    assert summary["n_eval"] == 3
    got = results(tmp_path)
    assert [r.prompt_id for r in got] == [0, 1, 2]
    searched = [r for r in got if r.flips_all]
    assert searched, "the threshold was chosen so that ablating all candidates flips"
    state = pipeline.setup(cfg)
    for row in searched:
        assert row.greedy and row.interactions and row.capability and row.dormant
        assert row.stages == ["greedy", "verification", "interactions", "dormant", "capability"]
        minimal = row.greedy.minimal
        probe = PromptProbe(state.engine, state.engine.prepare(row.instruction))
        masks = torch.ones(len(minimal) + 1, len(minimal)) - torch.cat(
            [torch.zeros(1, len(minimal)), torch.eye(len(minimal))]
        )
        scores = probe.score(minimal, masks)
        assert scores[0] < threshold and (scores[1:] >= threshold).all()  # flips, and 1-minimal
        assert row.interactions.n_masks == 64 and len(row.interactions.main_effects) >= len(minimal)
        assert row.capability.harmless_kl >= 0 and isinstance(row.dormant.features, list)
        saved = torch.load(tmp_path / "fm" / f"prompt_{row.prompt_id}" / "masks.pt")
        assert saved["features"] == [str(f) for f in row.interactions.features]
        rescored = probe.score([Feature.parse(f) for f in saved["features"]], saved["masks"])
        assert torch.allclose(rescored, saved["scores"], atol=1e-4)  # the FM's data, as scored
    assert (tmp_path / "direction.pt").exists() and json.loads(
        (tmp_path / "direction.json").read_text()
    )["layer"] >= 0


def test_no_refused_prompt_is_a_result_not_a_crash(tmp_path):
    cfg = make_cfg([*BASE, "judge.threshold=1000"], tmp_path)
    assert pipeline.run(cfg) is None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_refused"] == 0 and summary["flip_rate"] is None


@pytest.mark.slow
def test_a_stage_left_out_is_skipped(tmp_path, threshold):
    stages = "search.stages=[baseline,direction,greedy,verification]"
    pipeline.run(make_cfg([*BASE, f"judge.threshold={threshold}", stages], tmp_path))
    searched = [r for r in results(tmp_path) if r.searched]
    assert searched and all(r.stages in (["greedy"], ["greedy", "verification"]) for r in searched)
    assert any(r.verification for r in searched) and not (tmp_path / "fm").exists()


@pytest.mark.parametrize(
    "stages, missing",
    [("[baseline,greedy,interactions]", "direction"), ("[baseline,direction,dormant]", "greedy")],
)
def test_a_stage_without_its_input_stops_at_start_up(tmp_path, stages, missing):
    cfg = make_cfg([*BASE, f"search.stages={stages}"], tmp_path)
    with pytest.raises(ConfigError, match=f"needs \\['{missing}'\\]"):
        pipeline.setup(cfg)


def test_an_unknown_stage_or_intervention_is_named(tmp_path):
    with pytest.raises(ConfigError, match="'bogus'.*unknown"):
        pipeline.setup(make_cfg([*BASE, "search.stages=[baseline,bogus]"], tmp_path))
    with pytest.raises(ConfigError, match="search.intervention=bogus"):
        pipeline.setup(make_cfg([*BASE, "search.intervention=bogus"], tmp_path))
    with pytest.raises(ConfigError, match="search.candidates.direction=bogus"):
        pipeline.setup(make_cfg([*BASE, "search.candidates.direction=bogus"], tmp_path))
