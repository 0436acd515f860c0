"""W&B tracking: what a run logs is read back from its offline run files; sweeps and
presets compose and run; a W&B failure never costs a run its results."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
import wandb
import yaml
from lightning.pytorch.loggers import CSVLogger
from omegaconf import open_dict
from wandb.proto import wandb_internal_pb2

import refusal
from refusal import pipeline, report, tracking
from refusal.direction import Selection
from refusal.records import (
    BaselineRecord,
    DirectionRecord,
    DirectionScore,
    PromptResult,
    Summary,
    join,
    parse_row,
)
from tests.conftest import CONF, TINY, make_cfg, read_results
from train import objective

ROOT = CONF.parent
NP_ID = "gemma-2-2b/12-gemmascope-res-16k"


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch):
    """Offline W&B whatever the environment, and no W&B settings leaking between tests."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_RUN_GROUP", "WANDB_TAGS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    tracking.finish_open_run()


# --- reading an offline W&B run back -------------------------------------------------


def wandb_records(path: Path):
    """The protobuf records of a .wandb file: a LevelDB-style log of 32 KiB blocks, each
    record chunk behind a 7-byte header (CRC, length, type: full / first / middle / last)."""
    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, chunks = 7, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        chunk, pos = data[pos + header : pos + header + length], pos + header + length
        if kind == 0:
            continue
        chunks = chunk if kind in (1, 2) else chunks + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            yield record


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def _nest(flat: dict) -> dict:
    """Summary and history items come as nested keys ("a/b/path"); media keys hold dicts."""
    out = {}
    for key, value in flat.items():
        out[key] = value
        parent, _, leaf = key.rpartition("/")
        if parent and leaf in ("path", "_type"):
            out.setdefault(parent, {})
            if isinstance(out[parent], dict):
                out[parent][leaf] = value
    return out


def read_wandb_run(run_dir: Path) -> SimpleNamespace:
    """Everything an offline run logged: identity, config, history rows, summary, metric
    axes, artifacts (name -> type), exit."""
    # run.finish() only informs the W&B service, which closes the run file later; its
    # teardown waits for every stream to be written out.
    wandb.teardown()
    (run_file,) = run_dir.glob("run-*.wandb")
    run = SimpleNamespace(
        dir=run_dir, config={}, history=[], summary={}, exit_code=None, steps={}, artifacts={}
    )
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.id, run.group = record.run.run_id, record.run.run_group
            run.name, run.tags = record.run.display_name, list(record.run.tags)
        elif kind == "config":
            run.config |= {u.key: json.loads(u.value_json) for u in record.config.update}
        elif kind == "history":
            run.history.append(
                _nest({_key(i): json.loads(i.value_json) for i in record.history.item})
            )
        elif kind == "summary":
            run.summary |= {_key(u): json.loads(u.value_json) for u in record.summary.update}
        elif kind == "metric":  # define_metric: a key (or glob) and its x-axis
            run.steps[record.metric.name or record.metric.glob_name] = record.metric.step_metric
        elif kind == "artifact":
            run.artifacts[record.artifact.name] = record.artifact.type
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    run.summary = _nest(run.summary)
    return run


def table(run: SimpleNamespace, key: str) -> list[dict]:
    """A logged table's rows, increments of an incremental table concatenated."""
    rows = []
    for entry in run.history:
        if key in entry and isinstance(entry[key], dict) and "path" in entry[key]:
            data = json.loads((run.dir / "files" / entry[key]["path"]).read_text())
            rows += [dict(zip(data["columns"], row)) for row in data["data"]]
    return rows


def wandb_run_dirs(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "wandb").glob("offline-run-*"))


# --- the tracker, on synthetic results ------------------------------------------------


def synthetic_results() -> tuple[list[BaselineRecord], Selection, list[PromptResult], Summary]:
    baseline = [
        {"prompt_id": 0, "instruction": "a", "score": 2.0, "reply": "I can't.", "refused": True},
        {"prompt_id": 1, "instruction": "b", "score": 1.5, "reply": "No.", "refused": True},
        {"prompt_id": 2, "instruction": "c", "score": -3.0, "reply": "Sure", "refused": False},
    ]
    selection = Selection(
        layer=12,
        position=-1,
        direction=torch.zeros(4),
        scores=[
            DirectionScore(layer=11, position=-1, bypass=0.5, induce=1.0, kl=0.01),
            DirectionScore(layer=12, position=-1, bypass=-2.0, induce=2.0, kl=0.02),
        ],
        chosen_by="induce only",  # no candidate passed both filters
    )
    flipped = [  # prompt 0: every stage; 80 evals in 2 s over its rows
        {
            "stage": "greedy",
            "prompt_id": 0,
            "clean_score": 2.0,
            "candidates": [
                {"feature": "L12/7", "cos": 0.4},
                {"feature": "L12/9", "cos": 0.3},
                {"feature": "L12/11", "cos": 0.2},
            ],
            "flips_all": True,
            "minimal": ["L12/7", "L12/9"],
            "score": -1.0,
            "n_masks": 9,
            "batches": 3,
            "one_minimal": True,
            "evals": 9,
            "seconds": 0.5,
        },
        {"stage": "verification", "prompt_id": 0, "reply_after": "Here is how"}
        | {"flip_verified": True, "seconds": 0.25},
        {
            "stage": "interactions",
            "prompt_id": 0,
            "features": ["L12/7", "L12/9", "L12/11"],
            "n_masks": 64,
            "flip_fraction": 0.3,
            "test_auc": 0.9,
            "additive_test_auc": 0.85,
            "all_of_m_auc": 0.8,
            "interaction_gain": 0.05,
            "gain_interval": [0.01, 0.1],
            "interactions_significant": True,
            "n_distinct_masks": 64,
            "n_test": 12,
            "main_effects": [],
            "top_pairs": [{"a": "L12/7", "b": "L12/9", "interaction": -0.8}],
            "interactions": [[0.0, -0.8, 0.1], [-0.8, 0.0, 0.0], [0.1, 0.0, 0.0]],
            "checkpoint": None,
            "epochs": 10,
            "evals": 64,
            "seconds": 0.75,
        },
        {
            "stage": "dormant",
            "prompt_id": 0,
            "features": [
                {
                    "feature": "L12/300",
                    "before": 0.0,
                    "after": 1.7,
                    "score_without": -1.0,
                    "score_with": -2.5,
                    "effect": -1.5,
                }
            ],
            "evals": 7,
            "seconds": 0.25,
        },
        {"stage": "capability", "prompt_id": 0, "harmless_kl": 0.05, "seconds": 0.25},
    ]
    unflipped = {
        "stage": "greedy",
        "prompt_id": 1,
        "clean_score": 1.5,
        "candidates": [{"feature": "L12/7", "cos": 0.4}],
        "flips_all": False,
        "minimal": [],
        "score": 1.0,
        "n_masks": 1,
        "batches": 1,
        "one_minimal": False,
        "evals": 1,
        "seconds": 0.5,
    }
    rows = [parse_row(r | {"stage": "baseline"}) for r in baseline]
    results = join([*rows, *(parse_row(r) for r in [*flipped, unflipped])])
    summary = Summary(
        n_eval=3,
        n_refused=2,
        n_flipped_verified=1,
        flip_rate=0.5,
        minimal_set_sizes=[2],
        all_minimal_verified=True,
        fm_heldout_auc=[0.9],
        harmless_kl=[0.05],
        n_dormant=1,
        direction={"layer": 12, "position": -1},
        evals_per_s=32.4,
        batch_size=64,
        seconds_per_prompt=[2.0, 0.5],
        median_seconds_per_prompt=1.25,
        wall_seconds=3.0,
        seed=0,
    )
    return [r.baseline for r in results], selection, [r for r in results if r.searched], summary


def test_every_stage_is_read_back_from_the_offline_run(tmp_path):
    overrides = ["model=tiny_llama", "sae=gemma_scope_res_16k", "layers=[12]", "tags=[pilot]"]
    cfg = make_cfg(overrides, tmp_path)
    tracker = tracking.build(cfg)
    assert tracker.run is not None and tracker.run.offline
    baseline, selection, searched, summary = synthetic_results()
    tracker.baseline(baseline)
    tracker.direction(selection)
    for result in searched:
        tracker.prompt(result)
    tracker.summary(summary)
    tracker.finish()

    (run_dir,) = wandb_run_dirs(tmp_path)  # inside the job's output directory
    run = read_wandb_run(run_dir)
    assert run.exit_code == 0
    assert {"pilot", "model=tiny_llama", "sae=gemma_scope_res_16k", "layer=12"} <= set(run.tags)
    assert run.group == ""  # a single run belongs to no sweep
    assert run.config["search.fm.rank"] == 4 and run.config["layers"] == [12]
    assert run.config["choices.sae"] == "gemma_scope_res_16k"

    assert [r["score"] for r in table(run, "baseline/prompts")] == [2.0, 1.5, -3.0]
    scores = table(run, "direction/scores")
    assert [(s["layer"], s["chosen"]) for s in scores] == [(11, False), (12, True)]
    assert (run.summary["direction/layer"], run.summary["direction/position"]) == (12, -1)
    assert not run.summary["direction/admissible"]
    assert run.summary["direction/chosen_by"] == "induce only"

    prompts = table(run, "search/prompts")
    assert [p["prompt_id"] for p in prompts] == [0, 1]
    first = prompts[0]
    assert first["minimal"] == "L12/7 L12/9" and first["size"] == 2 and first["flip_verified"]
    assert first["neuronpedia"].split() == [
        f"https://www.neuronpedia.org/{NP_ID}/7",
        f"https://www.neuronpedia.org/{NP_ID}/9",
    ]
    assert (first["reply_before"], first["reply_after"]) == ("I can't.", "Here is how")
    assert first["evals"] == 80 and first["fm_test_auc"] == 0.9
    assert (first["fm_additive_test_auc"], first["fm_all_of_m_auc"]) == (0.85, 0.8)
    assert first["fm_interaction_gain"] == 0.05 and first["fm_interactions_significant"]
    assert prompts[1]["minimal"] == "" and not prompts[1]["flip_verified"]

    candidates = table(run, "direction/candidates")
    assert [(c["feature"], c["cos"], c["in_minimal"]) for c in candidates[:3]] == [
        ("L12/7", 0.4, True),
        ("L12/9", 0.3, True),
        ("L12/11", 0.2, False),
    ]
    assert table(run, "fm/top_pairs") == [
        {
            "prompt_id": 0,
            "a": "L12/7",
            "b": "L12/9",
            "interaction": -0.8,
            "neuronpedia_a": f"https://www.neuronpedia.org/{NP_ID}/7",
            "neuronpedia_b": f"https://www.neuronpedia.org/{NP_ID}/9",
        }
    ]
    (dormant,) = table(run, "dormant/features")
    assert (dormant["feature"], dormant["before"], dormant["after"], dormant["effect"]) == (
        "L12/300",
        0.0,
        1.7,
        -1.5,
    )
    assert (dormant["layer"], dormant["latent"]) == (12, 300)
    assert dormant["neuronpedia"] == f"https://www.neuronpedia.org/{NP_ID}/300"
    images = [h["fm/interactions"] for h in run.history if "fm/interactions" in h]
    assert len(images) == 1
    (fm,) = [h for h in run.history if "fm/test_auc" in h]
    assert (fm["fm/test_auc"], fm["fm/additive_test_auc"]) == (0.9, 0.85)
    assert (fm["fm/all_of_m_auc"], fm["fm/interaction_gain"]) == (0.8, 0.05)
    assert (run_dir / "files" / images[0]["path"]).read_bytes()[:4] == b"\x89PNG"

    s = run.summary
    assert (s["flip_rate"], s["n_dormant"], s["evals_per_s"]) == (0.5, 1, 32.4)
    assert (s["minimal_set_size_mean"], s["fm_auc_mean"]) == (2.0, 0.9)
    assert s["minimal_sets"] == {"0": ["L12/7", "L12/9"]} and s["minimal_set_sizes"] == [2]


class BrokenRun:
    """A W&B run whose every call fails, as when the service dies mid-run."""

    offline, dir = True, "/nonexistent/files"

    def __getattr__(self, name):
        raise RuntimeError(f"W&B is down ({name})")


def test_a_wandb_failure_is_a_warning_not_a_crash(caplog, tmp_path):
    tracker = tracking.Tracker(BrokenRun(), out_dir=tmp_path, fm_curves=True)
    baseline, selection, searched, summary = synthetic_results()
    tracker.baseline(baseline)
    tracker.direction(selection)
    tracker.prompt(searched[0])
    tracker.summary(summary)
    tracker.feature_sets()
    tracker.fm_loggers(0)[0].log_metrics({"val_loss": 1.0}, step=0)
    tracker.finish()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    stages = ("_define_steps", "baseline", "direction", "prompt", "summary", "feature_sets")
    for stage in (*stages, "FM metrics", "finish"):
        assert any(f"W&B {stage} failed" in m and "run directory" in m for m in warned), stage


class RecordingRun:
    """A W&B run that keeps what is logged to it."""

    def __init__(self):
        self.logged: list[dict] = []

    def log(self, payload: dict) -> None:
        self.logged.append(payload)


def test_pairs_that_do_not_beat_the_additive_model_are_not_logged_as_interactions():
    searched = synthetic_results()[2][0]
    assert searched.interactions is not None
    searched.interactions.interactions_significant = False
    run = RecordingRun()
    tracking.Tracker(run).prompt(searched)
    (payload,) = run.logged
    assert "fm/top_pairs" not in payload and "fm/interactions" in payload
    assert payload["fm/interaction_gain"] == 0.05
    assert payload["prompt_idx"] == searched.prompt_id and payload["prompt/jailbroken"] == 1


def test_a_wandb_that_cannot_start_leaves_a_working_run(tmp_path, monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise RuntimeError("no W&B today")

    monkeypatch.setattr("wandb.init", refuse)
    tracker = tracking.build(make_cfg(["model=tiny_llama", "sae=random", "layer=tiny"], tmp_path))
    assert tracker.run is None and tracker.fm_loggers(0) == []
    tracker.baseline(synthetic_results()[0])  # a no-op, not an error
    assert any("W&B start failed" in r.getMessage() for r in caplog.records)


def test_logger_none_and_csv(tmp_path):
    none = tracking.build(make_cfg(["logger=none"], tmp_path))
    assert none.run is None and none.fm_loggers(0) == []
    csv = tracking.build(make_cfg(["logger=csv"], tmp_path))
    (logger,) = csv.fm_loggers(3)
    assert isinstance(logger, CSVLogger) and csv.run is None
    assert Path(logger.log_dir) == tmp_path / "csv" / "fm_prompt_3"


@pytest.mark.parametrize(
    "env,netrc_host,offline",
    [
        ({}, None, True),  # no credentials anywhere
        ({}, "api.wandb.ai", False),  # `wandb login` wrote the netrc entry
        ({"WANDB_API_KEY": "k" * 40}, None, False),
        ({"WANDB_MODE": "offline"}, "api.wandb.ai", True),  # the mode decides where set
        ({"WANDB_MODE": "online"}, None, False),
        ({"WANDB_BASE_URL": "https://wandb.example.org"}, "wandb.example.org", False),
    ],
)
def test_wandb_goes_online_where_it_can_log_in(monkeypatch, tmp_path, env, netrc_host, offline):
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine {netrc_host} login user password {'p' * 40}\n" if netrc_host else "")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert refusal.wandb_offline() is offline


def test_objective_is_a_float_a_sweeper_can_rank():
    assert objective(None) == 0.0  # nothing refused: no flip rate
    assert objective(0.25) == 0.25
    assert objective([0.5, None, 1.0]) == 0.75 and objective([None]) == 0.0


# --- the pipeline, in process ----------------------------------------------------------


@pytest.mark.slow
def test_pipeline_logs_every_stage_to_wandb(tmp_path, flipping):
    threshold, marker = flipping
    overrides = [*TINY, f"judge.threshold={threshold}", "search.fm.log_curves=true"]
    cfg = make_cfg([*overrides, "logger.wandb.log_model=true"], tmp_path)
    with open_dict(cfg):
        cfg.judge.markers = [marker]
    pipeline.run(cfg)

    summary = Summary.model_validate_json((tmp_path / "summary.json").read_text())
    searched = [r for r in read_results(tmp_path) if r.searched]
    assert summary.n_flipped_verified >= 1, "the marker was chosen so that a flip verifies"
    (run_dir,) = wandb_run_dirs(tmp_path)
    run = read_wandb_run(run_dir)
    assert run.exit_code == 0 and "model=tiny_llama" in run.tags

    assert len(table(run, "baseline/prompts")) == summary.n_eval
    direction = DirectionRecord.model_validate_json((tmp_path / "direction.json").read_text())
    assert len(table(run, "direction/scores")) == len(direction.scores)
    logged = {p["prompt_id"]: p for p in table(run, "search/prompts")}
    assert logged.keys() == {r.prompt_id for r in searched}
    for result in searched:
        if result.flip_verified:
            assert logged[result.prompt_id]["minimal"].split() == [str(f) for f in result.minimal]
            assert logged[result.prompt_id]["flip_verified"]
            curve = [h for h in run.history if f"fm/prompt_{result.prompt_id}/val_loss" in h]
            assert curve, "the FM's training curve is logged through Lightning's WandbLogger"
            model = f"fm-{run.id}-prompt-{result.prompt_id}"
            assert run.artifacts[model] == "model", "log_model offline: the FM's checkpoint"
    assert run.artifacts[f"feature_sets-{run.id}"] == "feature_sets"
    assert any("fm/main_effects" in h for h in run.history)
    assert any("fm/interactions" in h for h in run.history)
    aucs = [a for a in summary.fm_heldout_auc if a is not None]
    assert run.summary["flip_rate"] == summary.flip_rate
    assert run.summary["n_dormant"] == summary.n_dormant
    assert run.summary["evals_per_s"] == pytest.approx(summary.evals_per_s)
    assert run.summary["minimal_set_sizes"] == summary.minimal_set_sizes
    sizes = summary.minimal_set_sizes
    assert run.summary["minimal_set_size_mean"] == pytest.approx(sum(sizes) / len(sizes))
    if aucs:
        assert run.summary["fm_auc_mean"] == pytest.approx(sum(aucs) / len(aucs))
    assert (tmp_path / "report.md").exists() and (tmp_path / "report_metrics.png").exists()


# --- presets and sweeps ----------------------------------------------------------------


@pytest.mark.parametrize(
    "override,target",
    [
        ("hydra/launcher=joblib", "JoblibLauncher"),
        ("hydra/launcher=submitit_local", "LocalLauncher"),
        ("hydra/launcher=submitit_slurm", "SlurmLauncher"),
        ("hydra/launcher=slurm_gpu", "SlurmLauncher"),
    ],
)
def test_launcher_presets_compose(override, target, tmp_path):
    cfg = make_cfg([override], tmp_path)
    assert cfg.hydra.launcher._target_.endswith(target)
    if override.endswith("slurm_gpu"):
        assert cfg.hydra.launcher.gpus_per_node == 1


def test_sweep_presets_compose(tmp_path):
    study = make_cfg(["hparams_search=organism_optuna"], tmp_path)
    assert study.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert study.hydra.mode.name == "MULTIRUN" and study.optimized_metric == "jailbreak_rate"
    assert set(study.hydra.sweeper.params) == {
        "search.candidates.top_k",
        "search.candidates.cos_floor",
        "search.candidates.direction",
        "search.ablation.scale",
    }
    layers = make_cfg(["experiment=organism_layer_sweep"], tmp_path)
    assert layers.hydra.mode.name == "MULTIRUN"
    assert layers.hydra.sweeper.params.layers == "[4],[8],[12],[16],[20],[24]"


def train(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    out = subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env | {"WANDB_SILENT": "true"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def job_runs(sweep: Path) -> list[SimpleNamespace]:
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    return [read_wandb_run(run_dir) for job in jobs for run_dir in wandb_run_dirs(job)]


@pytest.mark.slow
def test_submitit_local_multirun_groups_its_jobs_and_reports_them(tmp_path):
    sweep = tmp_path / "sweep"
    train(
        [
            "-m",
            "hydra/launcher=submitit_local",
            *(o for o in TINY if o != "layer=tiny"),
            "layers=[1],[2]",
            "judge.threshold=-11.4",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    runs = job_runs(sweep)
    assert len(runs) == 2 and runs[0].id != runs[1].id  # one W&B run per job
    assert runs[0].group == runs[1].group == f"train/{sweep.name}"
    assert [r.config["layers"] for r in runs] == [[1], [2]]
    # scalar keys a panel groups the jobs by, the findings as an artifact, and the
    # per-prompt numbers on their own axis
    assert [(r.config["layers_str"], r.config["layer"]) for r in runs] == [("1", 1), ("2", 2)]
    assert all(r.config["sae_width"] == 256 and r.config["intervention"] for r in runs)
    assert all(r.artifacts[f"feature_sets-{r.id}"] == "feature_sets" for r in runs)
    for key in tracking.PROMPT_METRICS:
        assert all(r.steps[key] == tracking.STEP for r in runs), key
    searched = [h for r in runs for h in r.history if "prompt/jailbroken" in h]
    assert searched and all(tracking.STEP in h for h in searched)
    assert all(r.exit_code == 0 for r in runs)
    assert all(r.dir.parent.parent.parent == sweep for r in runs)  # <sweep>/<job>/wandb/<run>
    report = (sweep / "report.csv").read_text().splitlines()
    assert len(report) == 3 and "layers=[1]" in report[1] and "layers=[2]" in report[2]
    assert "How the minimal sets of different jobs overlap" in (sweep / "report.md").read_text()


TIMINGS = ("wall_seconds", "stage_seconds", "seconds_per_prompt", "median_seconds_per_prompt")


@pytest.mark.slow
def test_shards_on_submitit_local_merge_to_the_unsharded_summary(tmp_path):
    # the per-prompt stages: the run-level controls are each shard's own
    common = [
        *(o for o in TINY if o != "logger=none"),
        "logger=none",
        "judge.threshold=-11.4",
        "search.stages=[baseline,direction,greedy,verification,interactions,random_control]",
    ]
    sweep, single = tmp_path / "sweep", tmp_path / "single"
    train(
        ["-m", "hydra/launcher=submitit_local", *common, "data.shard=0/2,1/2"]
        + [f"hydra.sweep.dir={sweep}"]
    )
    train([*common, f"hydra.run.dir={single}"])
    report.write(report.load_jobs(sweep), sweep, str(sweep))
    merged = json.loads((sweep / "shards_summary.json").read_text())
    whole = json.loads((single / "summary.json").read_text())
    assert merged["n_eval"] == 2 and merged["n_refused"] >= 1, "both shards' prompts"
    assert merged["config"]["data"]["shard"] is None
    unequal = (*TIMINGS, "evals_per_s", "config", "versions")
    assert {k: v for k, v in merged.items() if k not in unequal} == {
        k: v for k, v in whole.items() if k not in unequal
    }
    table = (sweep / "report.csv").read_text().splitlines()
    assert len(table) == 2 and "shards 0/2, 1/2" in table[1]  # one study, one row


@pytest.mark.slow
def test_organism_layer_sweep_runs_jobs_in_one_process_each_with_its_own_run(tmp_path):
    sweep = tmp_path / "sweep"
    train(
        [
            "experiment=organism_layer_sweep",
            *(o for o in TINY if o != "layer=tiny"),
            "hydra.sweeper.params.layers='[1],[2]'",
            "judge.threshold=1000",  # nothing refused: fast, and still a result
            f"hydra.sweep.dir={sweep}",
        ]
    )
    runs = job_runs(sweep)
    assert len(runs) == 2 and runs[0].id != runs[1].id
    assert runs[0].group == runs[1].group == f"organism_layer_sweep/{sweep.name}"
    assert all(r.exit_code == 0 and r.summary["n_refused"] == 0 for r in runs)


@pytest.mark.slow
def test_optuna_sweep_keeps_its_study_and_optimises_the_returned_metric(tmp_path):
    sweep, db = tmp_path / "sweep", tmp_path / "optuna.db"
    train(
        [
            "hparams_search=organism_optuna",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.sampler.n_startup_trials=3",
            f"hydra.sweeper.storage=sqlite:///{db}",
            *TINY,
            "judge.threshold=1000",  # no prompt refused: jailbreak rate None, counted as 0.0
            f"hydra.sweep.dir={sweep}",
        ]
    )
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == 0.0
    # top_k is pinned on the command line (TINY), the others are searched
    searched = {"search.candidates.cos_floor", "search.candidates.direction"}
    assert set(results["best_params"]) == searched | {"search.ablation.scale"}
    assert len(job_runs(sweep)) == 3
    study = optuna.load_study(study_name="organism_search_settings", storage=f"sqlite:///{db}")
    assert len(study.trials) == 3 and all(t.value == 0.0 for t in study.trials)
