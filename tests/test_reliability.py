"""Resume after SIGKILL, determinism, and fuzzed inputs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refusal import data, pipeline
from refusal.errors import ConfigError, RefusalError
from refusal.records import join, parse_row
from refusal.stages import direction as direction_stage
from tests.conftest import CONF, make_cfg
from tests.test_pipeline import BASE, threshold  # noqa: F401  (fixture)


def rows(run_dir: Path) -> list[dict]:
    text = (run_dir / "results.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def readout(run_dir: Path) -> dict:
    """What must not depend on luck: minimal sets, FM readout, dormant features, per prompt."""
    results = join([parse_row(r) for r in rows(run_dir)])
    return {
        r.prompt_id: (
            r.greedy.model_dump(exclude={"seconds"}),
            r.interactions.main_effects if r.interactions else None,
            r.interactions.top_pairs if r.interactions else None,
            r.dormant_features,
        )
        for r in results
        if r.greedy is not None
    }


@pytest.mark.slow
def test_same_seed_same_results(tmp_path, threshold):  # noqa: F811
    for name in ("a", "b"):
        pipeline.run(make_cfg([*BASE, f"judge.threshold={threshold}"], tmp_path / name))
    assert readout(tmp_path / "a") == readout(tmp_path / "b")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["seed"] == 0 and {"torch", "transformers", "sae-lens"} <= set(
        summary["versions"]
    )


def launch(run_dir: Path, threshold: float, *extra: str) -> subprocess.Popen:  # noqa: F811
    overrides = [*BASE, f"judge.threshold={threshold}", f"hydra.run.dir={run_dir}", *extra]
    return subprocess.Popen(
        [sys.executable, "train.py", *overrides],
        cwd=CONF.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the run finished before the kill point"
        assert time.time() < deadline, "kill point never reached"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def lines(run_dir: Path, stage: str) -> int:
    path = run_dir / "results.jsonl"
    return (
        sum(f'"stage": "{stage}"' in line for line in path.read_text().splitlines())
        if path.exists()
        else 0
    )


@pytest.mark.slow
def test_resume_after_sigkill_at_several_points(tmp_path, threshold):  # noqa: F811
    clean, run_dir = tmp_path / "clean", tmp_path / "killed"
    assert launch(clean, threshold).wait() == 0
    kill_points = [
        lambda: lines(run_dir, "baseline") >= 1,  # mid-baseline
        lambda: (run_dir / "direction.json").exists(),  # between direction and search
        lambda: lines(run_dir, "greedy") >= 1,  # mid-search
    ]
    for n, ready in enumerate(kill_points):
        kill_when(launch(run_dir, threshold, *(["resume=true"] if n else [])), ready)
    with (run_dir / "results.jsonl").open("a") as f:
        f.write('{"stage": "greedy", "prompt_id": 9')  # a torn write, as a kill mid-line leaves
    assert launch(run_dir, threshold, "resume=true").wait() == 0
    got = rows(run_dir)
    keys = [(r["stage"], r["prompt_id"]) for r in got]
    assert len(keys) == len(set(keys)), "a finished prompt was redone"
    assert sorted(keys) == sorted((r["stage"], r["prompt_id"]) for r in rows(clean))
    assert readout(run_dir) == readout(clean)
    assert not list(run_dir.rglob("*.tmp"))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    content=st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(str.encode),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(
                    st.sampled_from(["instruction", "prompt", "goal", "x"]), inner, max_size=3
                )
            ),
            max_leaves=10,
        ).map(lambda v: json.dumps(v).encode()),
    ),
    suffix=st.sampled_from([".json", ".jsonl", ".csv"]),
)
def test_fuzzed_prompt_files_load_or_fail_clearly(tmp_path_factory, content, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"prompts{suffix}"
    path.write_bytes(content)
    try:
        prompts = data.read_file(path)
    except RefusalError as error:
        assert str(path) in str(error)
    else:
        assert prompts and all(isinstance(p, str) and p.strip() for p in prompts)


OVERRIDES = st.lists(
    st.sampled_from(
        [
            "layers=[0]",
            "layers=[3]",
            "layers=[4]",
            "layers=[-1]",
            "layers=[1,2]",
            "model.device=cuda",
            "model.device=cpu",
            "model.dtype=float32",
            "model.dtype=float99",
            "search.ablation.mode=scale",
            "search.ablation.mode=bogus",
            "search.ablation.positions=all",
            "search.ablation.positions=nowhere",
            "search.intervention=steer",
            "search.intervention=bogus",
            "search.stages=[baseline,greedy]",
            "search.fm.target=mse",
            "search.fm.target=hinge",
            "data.max_eval=0",
            "data.max_eval=1",
            "data.eval=/nonexistent.json",
            "data.eval=builtin:harmful/nope",
            "data.eval=builtin:nothing/eval",
            "judge.refusal_tokens=[I]",
            "judge.refusal_tokens=['I am']",
            "search.candidates.top_k=0",
            "search.fm.n_masks=1",
            "search.batch_size=auto",
            "search.batch_size=0",
            "seed=3",
        ]
    ),
    max_size=4,
    unique=True,
)


@pytest.mark.slow
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(overrides=OVERRIDES)
def test_fuzzed_overrides_validate_or_fail_clearly(tmp_path_factory, overrides):
    """Every combination either sets up a run or raises one of the clear errors."""
    cfg = make_cfg(
        ["model=tiny_llama", "sae=random", "layer=tiny", "logger=none", *overrides],
        tmp_path_factory.mktemp("cfg"),
    )
    try:
        pipeline.setup(cfg)
    except RefusalError as error:
        assert str(error)


def direction_ctx(run_dir: Path, model: str, *extra: str):
    overrides = [f"model={model}", "sae=random", "layer=tiny", "logger=none", *extra]
    sizes = ["data.n_train=4", "data.n_val=4", "search.direction.filter_prompts=false"]
    return pipeline.setup(make_cfg([*overrides, *sizes], run_dir))


def test_a_new_run_never_reads_a_stale_direction(tmp_path):
    first = direction_stage.run(direction_ctx(tmp_path, "tiny_llama"))
    ctx = direction_ctx(tmp_path, "tiny_gemma2")  # same directory, no resume
    (aside,) = tmp_path.glob("previous-*")
    assert (aside / direction_stage.SAVED).exists() and (aside / "settings.json").exists()
    second = direction_stage.run(ctx)
    assert ctx.directions is not None and ctx.directions.shape[-1] == ctx.lm.d_model
    assert not torch.equal(first.direction, second.direction)


def test_resume_with_other_settings_stops_and_names_them(tmp_path):
    direction_ctx(tmp_path, "tiny_llama")
    direction_ctx(tmp_path, "tiny_llama", "resume=true", "search.batch_size=8")  # unscored
    with pytest.raises(ConfigError, match=r"model\.name: tiny_llama -> tiny_gemma2"):
        direction_ctx(tmp_path, "tiny_gemma2", "resume=true")
    assert not list(tmp_path.glob("previous-*")), "a refused resume moved nothing"


@pytest.mark.parametrize("logger", ["none", "csv"])
def test_how_a_run_is_logged_is_not_one_of_its_settings(tmp_path, logger):
    keys = pipeline.settings(make_cfg([*BASE, f"logger={logger}"], tmp_path))
    assert "seed" in keys and not [k for k in keys if k.startswith("logger")]
