"""End to end on tiny_llama with random SAEs: every stage runs and writes its results."""

import json

import pytest
import torch

from refusal import pipeline
from refusal.engine import Feature, PromptProbe
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
]


def parse_feature(text: str) -> Feature:
    layer, latent = text[1:].split("/")
    return Feature(int(layer), int(latent))


@pytest.fixture(scope="module")
def threshold(tmp_path_factory) -> float:
    """A refusal threshold between the tiny model's clean score and its all-candidates score."""
    out = tmp_path_factory.mktemp("probe")
    pipeline.run(make_cfg([*BASE, "judge.threshold=-1000", "search.batch_size=auto"], out))
    size = json.loads((out / "summary.json").read_text())["batch_size"]
    assert size & (size - 1) == 0, "auto tunes the batch size to a power of two"
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    searched = [r for r in rows if r["stage"] == "search" and r["greedy"]]
    search = min(searched, key=lambda r: r["greedy"]["score"] - r["clean_score"])
    assert search["greedy"]["score"] < search["clean_score"], "no candidate set lowers the score"
    return (search["clean_score"] + search["greedy"]["score"]) / 2


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
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["prompt_id"] for r in rows if r["stage"] == "baseline"] == [0, 1, 2]
    searched = [
        r for r in rows if r["stage"] == "search" and r["greedy"] and r["greedy"]["flips_all"]
    ]
    assert searched, "the threshold was chosen so that ablating all candidates flips"
    state = pipeline.setup(cfg)
    for row in searched:
        minimal = [parse_feature(f) for f in row["greedy"]["minimal"]]
        probe = PromptProbe(state.engine, state.engine.prepare(row["instruction"]))
        masks = torch.ones(len(minimal) + 1, len(minimal)) - torch.cat(
            [torch.zeros(1, len(minimal)), torch.eye(len(minimal))]
        )
        scores = probe.score(minimal, masks)
        assert scores[0] < threshold and (scores[1:] >= threshold).all()  # flips, and 1-minimal
        assert row["interactions"]["n_masks"] == 64 and len(
            row["interactions"]["main_effects"]
        ) >= len(minimal)
        assert row["harmless_kl"] >= 0 and isinstance(row["dormant"], list)
        saved = torch.load(tmp_path / "fm" / f"prompt_{row['prompt_id']}" / "masks.pt")
        assert saved["features"] == row["interactions"]["features"]
        rescored = probe.score([parse_feature(f) for f in saved["features"]], saved["masks"])
        assert torch.allclose(rescored, saved["scores"], atol=1e-4)  # the FM's data, as scored
    assert (tmp_path / "direction.pt").exists() and json.loads(
        (tmp_path / "direction.json").read_text()
    )["layer"] >= 0


def test_no_refused_prompt_is_a_result_not_a_crash(tmp_path):
    cfg = make_cfg([*BASE, "judge.threshold=1000"], tmp_path)
    assert pipeline.run(cfg) is None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_refused"] == 0 and summary["flip_rate"] is None
