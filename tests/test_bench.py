"""The throughput benchmark runs end to end on a tiny model and writes its JSON."""

import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from benchmarks import ablation_throughput


def bench_cfg(overrides: list[str], output_dir) -> DictConfig:
    """Compose conf/bench.yaml as `python benchmarks/ablation_throughput.py <overrides>`
    would, the run directory at output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=ablation_throughput.CONF, version_base="1.3"):
        cfg = compose("bench", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.mark.slow
def test_benchmark_writes_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    cfg = bench_cfg(
        [
            "model=tiny_llama",
            "sae=random",
            "layer=tiny",
            "bench.n_masks=16",
            "bench.n_naive=3",
            "bench.max_new_tokens=4",
            "bench.n_greedy=2",
            "judge.threshold=-1000",  # every prompt counts as refused
            f"bench.out={out}",
        ],
        tmp_path / "run",
    )
    ablation_throughput.main(cfg)
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
    n_prompts = cfg.bench.n_agreement_prompts
    assert 0 < result["mfu"] < 1.5 and result["n_agreement_masks"] == 3 * n_prompts
    assert len(result["flip_agreement_per_prompt"]) == n_prompts
    assert all(isinstance(row["naive_reply"], str) for row in result["agreement_masks"])
    assert {"prompts", "batched_mean_evals", "sequential_mean_evals"} <= set(result["greedy"])
