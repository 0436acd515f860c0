"""Bad input gets a short, clear error: what was wrong, the value, what to do; exit != 0."""

import json
import os
import subprocess
import sys

import pytest

from refusal import saes
from refusal.callbacks import check_writable
from refusal.errors import RefusalError
from tests.conftest import CONF

TINY = ["model=tiny_llama", "sae=random", "layer=tiny", "logger=none", "data.max_eval=1"]


def cli(args: list[str], tmp_path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=CONF.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def assert_clear(out: subprocess.CompletedProcess, *fragments: str) -> None:
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    for fragment in fragments:
        assert fragment in out.stderr, out.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,fragments",
    [
        (["model=nope"], ["Could not find 'model/nope'", "smollm2_organism", "tiny_llama"]),
        (["sae=nope"], ["Could not find 'sae/nope'", "gemma_scope_res_16k"]),
        (["data=nope"], ["Could not find 'data/nope'", "default"]),
        ([*TINY, "layers=[9]"], ["layer 9 is out of range", "0..3"]),
        ([*TINY, "model.device=cuda"], ["no CUDA device", "model.device=cpu"]),
        (
            ["model=gemma2_2b_it", "sae=random", "logger=none"],
            ["google/gemma-2-2b-it", "cannot be reached"],
        ),
        (
            [*TINY[:1], "sae=gemma_scope_res_16k", "layers=[1]", "sae.id=nope_{layer}"],
            ["SAE id 'nope_1' is not in release 'gemma-scope-2b-pt-res-canonical'"],
        ),
        (
            [*TINY, "data.eval=/nonexistent/prompts.json"],
            ["/nonexistent/prompts.json does not exist"],
        ),
    ],
)
def test_cli_errors(args, fragments, tmp_path):
    args = [a.replace("sae.id=nope_{layer}", "sae.id='nope_{layer}'") for a in args]
    assert_clear(cli(args, tmp_path), *fragments)


@pytest.mark.slow
def test_malformed_prompt_file_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"instruction": "ok"},\n {"instruction": }\n]')
    assert_clear(cli([*TINY, f"data.eval={bad}"], tmp_path), f"{bad}, line 3")


@pytest.mark.slow
def test_d_in_mismatch_from_cli(tmp_path):
    saes.random_sae(32, 16, 1, seed=0).save_model(tmp_path / "saes" / "layer_1")
    args = [*TINY[:1], "sae=local", f"sae.path='{tmp_path}/saes/layer_{{layer}}'", "layers=[1]"]
    assert_clear(cli(args, tmp_path), "d_in=32", "hidden size 64")


@pytest.mark.slow
def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = subprocess.run(
        [sys.executable, "train.py", *TINY, f"hydra.run.dir={blocker}/run"],
        cwd=CONF.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_clear(out, "cannot write results to", "hydra.run.dir")


@pytest.mark.slow
def test_full_error_shows_the_traceback(tmp_path):
    out = cli([*TINY, "layers=[9]"], tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigError" in out.stderr


def test_check_writable_reports_disk_full(tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda _: usage(10, 10, 0))
    with pytest.raises(RefusalError, match="only 0 MB free"):
        check_writable(tmp_path)


def test_results_already_written_survive_an_error(tmp_path):
    """A failing second run on the same directory leaves the first run's files intact."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"n_eval": 3}))
    (run_dir / "results.jsonl").write_text('{"stage": "baseline", "prompt_id": 0}\n')
    out = cli([*TINY, "layers=[9]"], tmp_path)
    assert out.returncode != 0
    assert json.loads((run_dir / "summary.json").read_text()) == {"n_eval": 3}
    assert (run_dir / "results.jsonl").read_text().count("\n") == 1
