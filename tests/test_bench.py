"""The throughput benchmark runs end to end on a tiny model and writes its JSON, run as
`make bench` runs it."""

import json
import subprocess
import sys

import pytest

from tests.conftest import CONF


@pytest.mark.slow
def test_benchmark_writes_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    overrides = [
        "model=tiny_llama",
        "sae=random",
        "layer=tiny",
        "bench.n_masks=16",
        "bench.n_naive=3",
        "bench.max_new_tokens=4",
        "bench.n_greedy=2",
        "judge.threshold=-1000",  # every prompt counts as refused
        "search.direction.filter_prompts=false",  # which would leave no harmless prompt
        f"bench.out={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    command = [sys.executable, "-m", "benchmarks.ablation_throughput", *overrides]
    subprocess.run(command, cwd=CONF.parent, check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert {"ratio_vs_naive", "mfu", "peak_rss_gb", "flip_agreement"} <= set(result["headline"])
    for key in (*result["headline"], "batch_size", "prompt_tokens", "device", "dtype"):
        assert result[key] is not None, key
    assert set(result["evals_per_s"]) == {
        "naive",
        "full_forward",
        "batched_full_forward",
        "prefix_cached",
        "engine",
    }
    assert result["max_abs_diff_engine_vs_hooked"] < 1e-3
    n_prompts = result["settings"]["n_agreement_prompts"]
    assert 0 < result["mfu"] < 1.5 and result["n_agreement_masks"] == 3 * n_prompts
    assert len(result["flip_agreement_per_prompt"]) == n_prompts
    assert all(isinstance(row["naive_reply"], str) for row in result["agreement_masks"])
    assert {"prompts", "batched_mean_evals", "sequential_mean_evals"} <= set(result["greedy"])
