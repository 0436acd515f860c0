"""Reports from synthetic run and sweep directories (the files a run writes), and the
W&B source failing fast and clearly when W&B cannot be reached."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from refusal import report
from refusal.records import Summary, join, parse_row
from tests.conftest import CONF

PNG = b"\x89PNG"


def make_run(path: Path, layers: list[int], flips: dict[int, list[str]], overrides=()) -> Path:
    """A run directory as the pipeline writes it: 4 prompts, 0-2 refused, `flips` verified
    (prompt id -> minimal set), with an FM readout and one dormant feature per flip."""
    path.mkdir(parents=True)
    rows = [
        {
            "stage": "baseline",
            "prompt_id": i,
            "instruction": f"harmful {i}",
            "score": 3.0 - i,
            "reply": "I can't",
            "refused": i < 3,
        }
        for i in range(4)
    ]
    for i in range(3):
        minimal = flips.get(i)
        rows.append(
            {
                "stage": "greedy",
                "prompt_id": i,
                "clean_score": 3.0 - i,
                "candidates": [{"feature": f, "cos": 0.3} for f in minimal or ["L1/1"]],
                "flips_all": bool(minimal),
                "minimal": minimal or [],
                "score": -1.0,
                "n_masks": 5,
                "batches": 2,
                "one_minimal": True,
                "evals": 50,
                "seconds": 1.0,
            }
        )
        if minimal:
            rows += _flip_details(i, minimal)
    with (path / "results.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write('{"stage": "greedy", "prompt_i')  # a torn last line, as from a killed run
    results = join([parse_row(r) for r in rows])
    run = {"batch_size": 8, "wall_seconds": 3.0, "seed": 0, "config": {"layers": layers}}
    summary = Summary.of(results, None, **run)
    (path / "summary.json").write_text(json.dumps(summary.to_json()))
    if overrides:
        (path / ".hydra").mkdir()
        (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    return path


def _flip_details(prompt_id: int, minimal: list[str]) -> list[dict]:
    """The rows of the stages after greedy for a verified flip; the FM beats its additive
    baseline on prompt 0 only."""
    features = [*minimal, "L9/99"]
    n = len(features)
    gain, interval = (0.05, [0.01, 0.09]) if prompt_id == 0 else (0.0, [-0.02, 0.02])
    return [
        {"stage": "verification", "prompt_id": prompt_id, "reply_after": "Sure"}
        | {"flip_verified": True},
        {
            "stage": "interactions",
            "prompt_id": prompt_id,
            "features": features,
            "n_masks": 64,
            "flip_fraction": 0.5,
            "test_auc": 0.8,
            "additive_test_auc": 0.8 - gain,
            "all_of_m_auc": 0.7,
            "interaction_gain": gain,
            "gain_interval": interval,
            "interactions_significant": prompt_id == 0,
            "n_distinct_masks": 64,
            "n_test": 12,
            "main_effects": [],
            "top_pairs": [],
            "interactions": [
                [0.0 if i == j else 0.1 * (i - j) for j in range(n)] for i in range(n)
            ],
            "checkpoint": None,
            "epochs": 1,
        },
        {
            "stage": "dormant",
            "prompt_id": prompt_id,
            "features": [
                {"feature": "L9/5", "before": 0.0, "after": 1.0}
                | {"score_without": -1.0, "score_with": -2.0, "effect": -1.0}
            ],
        },
        {"stage": "capability", "prompt_id": prompt_id, "harmless_kl": 0.1},
    ]


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Three jobs of a layer-style sweep with known minimal sets."""
    common = ["model=tiny_llama", "sae=random"]
    make_run(tmp_path / "0", [1], {0: ["L1/1", "L1/2"], 1: ["L1/3"]}, [*common, "layers=[1]"])
    make_run(tmp_path / "1", [1], {0: ["L1/1"], 2: ["L1/4"]}, [*common, "layers=[1]", "seed=1"])
    make_run(tmp_path / "10", [2], {}, [*common, "layers=[2]"])
    return tmp_path


def test_sweep_report_compares_jobs(sweep):
    path = report.write(report.load_jobs(sweep), sweep, str(sweep))
    table = pd.read_csv(sweep / "report.csv", dtype={"path": str})
    assert list(table["path"]) == ["0", "1", "10"]  # job order, not string order
    assert list(table["job"]) == ["0: layers=[1]", "1: layers=[1] seed=1", "10: layers=[2]"]
    assert list(table["n_flipped"]) == [2, 2, 0]
    assert table["flip_rate"].tolist()[:2] == pytest.approx([2 / 3, 2 / 3])
    assert table["mean_set_size"].tolist()[:2] == [1.5, 1.0] and table["fm_auc"][0] == 0.8
    assert list(table["n_dormant"]) == [2, 2, 0]
    # job 0 flipped prompts 0 (gain 0.05, an interaction) and 1 (gain 0); job 10 nothing
    assert table["fm_interaction_gain"][0] == pytest.approx(0.025)
    assert list(table["n_fm_interactions"]) == [1, 1, 0]

    overlap = pd.read_csv(sweep / "report_overlap.csv").set_index(["job_a", "job_b"])
    pair = overlap.loc[("0: layers=[1]", "1: layers=[1] seed=1")]
    # prompt 0 flipped in both: {L1/1, L1/2} vs {L1/1} -> 1/2; shared features: L1/1
    assert pair["minimal_set_jaccard"] == 0.5 and pair["shared_features"] == 1
    assert pair["flipped_prompt_jaccard"] == pytest.approx(1 / 3)  # {0,1} vs {0,2}
    assert overlap.loc[("0: layers=[1]", "0: layers=[1]")]["minimal_set_jaccard"] == 1.0
    assert pd.isna(overlap.loc[("0: layers=[1]", "10: layers=[2]")]["minimal_set_jaccard"])

    prompts = pd.read_csv(sweep / "report_prompts.csv")
    assert len(prompts) == 12 and set(prompts["job"]) == set(table["job"])
    for name in ("report_metrics.png", "report_overlap.png"):
        assert (sweep / name).read_bytes()[:4] == PNG
    text = path.read_text()
    assert "## Per job" in text and "10: layers=[2]" in text and "report_overlap.png" in text


def test_run_report_lists_prompts_and_interaction_heatmaps(tmp_path):
    run = make_run(tmp_path / "run", [1, 2], {0: ["L1/1", "L2/7"], 2: ["L1/3"]})
    path = report.write(report.load_jobs(run), run, str(run))
    text = path.read_text()
    assert "## Prompts" in text and "L1/1 L2/7" in text and "harmful 3" in text
    for pid in (0, 2):
        assert (run / f"report_fm_prompt_{pid}.png").read_bytes()[:4] == PNG
        assert f"report_fm_prompt_{pid}.png" in text
    prompts = pd.read_csv(run / "report_prompts.csv")
    assert list(prompts["refused"]) == [True, True, True, False]
    assert list(prompts["size"].fillna(0)) == [2, 0, 1, 0]
    # stage columns stay empty where the stage never ran (prompt 1: no flip; 3: not refused)
    assert list(prompts["n_dormant"].fillna(-1)) == [1, -1, 1, -1]
    assert list(prompts["evals"].fillna(0)) == [50, 50, 50, 0]
    assert list(prompts["interactions_significant"].fillna(-1)) == [True, -1, False, -1]
    assert list(prompts["additive_auc"].fillna(0)) == pytest.approx([0.75, 0, 0.8, 0])
    # interactions are spoken of only where the gain's interval lies above zero
    assert report.FM_NOTE in text
    (job,) = report.load_jobs(run)
    assert "FM interactions (AUC gain over additive +0.050 [+0.010, +0.090])" in (
        report.heatmap_title(0, job.interactions[0])
    )
    title = report.heatmap_title(2, job.interactions[2])
    assert "no interaction shown" in title and "interactions" not in title


def test_cli_writes_elsewhere_with_out(sweep, tmp_path, capsys):
    out = tmp_path / "elsewhere"
    assert report.main([str(sweep), "--out", str(out)]) == out / "report.md"
    assert (out / "report.csv").exists() and not (sweep / "report.csv").exists()
    assert str(out / "report.md") in capsys.readouterr().out


def test_a_directory_without_runs_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        report.main([str(tmp_path)])
    assert exit_.value.code == 2
    assert "holds no run: no summary.json" in capsys.readouterr().err


def test_sweep_callback_writes_the_sweep_report(sweep):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    report.SweepReport().on_multirun_end(config)
    assert "10: layers=[2]" in (sweep / "report.md").read_text()


def test_a_failed_report_warns_and_returns_none(tmp_path, caplog):
    (tmp_path / "summary.json").write_text("{not json")
    assert report.write_quietly(tmp_path) is None
    assert "python -m refusal.report" in caplog.text


def test_wandb_runs_report_like_run_directories(monkeypatch, tmp_path):
    """The W&B source reads what the tracker puts in each run's summary and config."""

    def fake_run(run_id: str, layer: int, minimal_sets: dict) -> SimpleNamespace:
        summary = {"n_eval": 4, "n_refused": 2, "n_flipped_verified": len(minimal_sets)}
        summary |= {"flip_rate": len(minimal_sets) / 2, "minimal_sets": minimal_sets}
        summary |= {"minimal_set_sizes": [len(m) for m in minimal_sets.values()]}
        config = {"layers": [layer], "overrides": ["sae=random", f"layers=[{layer}]"]}
        return SimpleNamespace(id=run_id, summary=summary, config=config)

    runs = [fake_run("a1", 6, {"0": ["L6/1", "L6/2"]}), fake_run("b2", 12, {"0": ["L12/5"]})]
    asked = {}

    def runs_of(path, filters=None):
        asked.update(path=path, filters=filters)
        return runs

    monkeypatch.setattr(report, "wandb_api", lambda: SimpleNamespace(runs=runs_of))
    path = report.main(["--wandb", "me/refusal", "--group", "train/x", "--out", str(tmp_path)])
    assert asked == {"path": "me/refusal", "filters": {"group": "train/x"}}
    table = pd.read_csv(tmp_path / "report.csv")
    assert list(table["job"]) == ["a1: layers=[6]", "b2: layers=[12]"]
    assert list(table["mean_set_size"]) == [2.0, 1.0]
    overlap = pd.read_csv(tmp_path / "report_overlap.csv")
    assert overlap["flipped_prompt_jaccard"].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert "W&B me/refusal" in path.read_text()


def test_wandb_source_fails_fast_and_clearly_offline():
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    started = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "refusal.report", "--wandb", "someone/refusal"],
        cwd=CONF.parent,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ") and "W&B" in out.stderr
    assert "python -m refusal.report <run or sweep dir>" in out.stderr or (
        "WANDB_API_KEY" in out.stderr
    )
    assert time.time() - started < 30
