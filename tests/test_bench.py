"""The throughput benchmark runs end to end on a tiny model and writes its JSON."""

import json

import pytest

from benchmarks import ablation_throughput


@pytest.mark.slow
def test_benchmark_writes_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    ablation_throughput.main(
        [
            "model=tiny_llama",
            "sae=random",
            "layer=tiny",
            "n_masks=16",
            "n_naive=3",
            "max_new_tokens=4",
            "n_greedy=2",
            "judge.threshold=-1000",  # every prompt counts as refused
            f"out={out}",
        ]
    )
    result = json.loads(out.read_text())
    for key in (
        *ablation_throughput.HEADLINE,
        "batch_size",
        "prompt_tokens",
        "device",
        "dtype",
    ):
        assert result[key] is not None, key
    assert set(result["evals_per_s"]) == {
        "naive",
        "full_forward",
        "batched_full_forward",
        "prefix_cached",
        "engine",
    }
    assert result["max_abs_diff_engine_vs_hooked"] < 1e-3
    n_prompts = ablation_throughput.DEFAULTS["n_agreement_prompts"]
    assert 0 < result["mfu"] < 1.5 and result["n_agreement_masks"] == 3 * n_prompts
    assert len(result["flip_agreement_per_prompt"]) == n_prompts
    assert all(isinstance(row["naive_reply"], str) for row in result["agreement_masks"])
    assert {"prompts", "batched_mean_evals", "sequential_mean_evals"} <= set(result["greedy"])
