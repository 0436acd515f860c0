"""The throughput benchmark runs end to end on a tiny model and writes its JSON, run as
`make bench` runs it."""

import json
import subprocess
import sys

import pytest
import torch

from refusal.engine import PromptProbe
from refusal.judge import Openings
from tests.conftest import CONF, tiny_engine
from tests.test_engine import PROMPT, active_features, clean_reply

OPENING = "I'm sorry, but I can't"


@pytest.mark.slow
@pytest.mark.parametrize("planted", [False, True], ids=["as loaded", "planted opening"])
def test_benchmark_writes_its_figures(tmp_path, planted):
    out = tmp_path / "bench.json"
    # random weights refuse nothing: every prompt counted as refused, or made to open with a
    # refusal marker on the first four eval prompts (the benchmark's and the agreement's),
    # as on a GPU at real sizes
    refusing = (
        [f'bench.plant_opening="{OPENING}"', "bench.plant_prompts=4"]
        if planted
        else ["judge.threshold=-1000"]
    )
    overrides = [
        "model=tiny_llama",
        "sae=random",
        "layer=tiny",
        "search.fm.n_masks=24",
        "search.controls.random.n_draws=8",
        "bench.n_naive=3",
        "bench.max_new_tokens=4",
        "bench.n_greedy=2",
        *refusing,
        "search.direction.filter_prompts=false",  # which would leave no harmless prompt
        f"bench.out={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    command = [sys.executable, "-m", "benchmarks.ablation_throughput", *overrides]
    subprocess.run(command, cwd=CONF.parent, check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert {"ratio_vs_batched_hooked", "ratio_vs_naive", "mfu", "peak_rss_gb"} <= set(
        result["headline"]
    )
    for key in (*result["headline"], "batch_size", "prompt_tokens", "device", "dtype"):
        assert result[key] is not None, key
    # planted: a refusal that ablating some of the candidates undoes, so the masks are drawn
    # around greedy's own M; else nothing flips, M is a stand-in, and says so
    assert result["clean_reply"].startswith(OPENING) is planted
    assert result["minimal_set_is_real"] is planted and result["minimal_set"]
    families = result["families"]
    assert {"greedy", "fm", "random"} <= set(families)
    assert families["fm"]["n_masks"] == 24 and families["random"]["n_masks"] == 8
    for timing in families.values():
        assert set(timing["evals_per_s"]) == {"naive", "batched_hooked", "engine"}
        assert timing["ratio_vs_batched_hooked"] > 0 and 0 < timing["mfu"] < 1.5
        assert 0 < timing["batched_hooked_mfu"] < 1.5
        # the engine's walk fed ahead issues at least the work its scores need; the hooked
        # forward runs every block for every row and generates the whole opening
        needed = timing["engine_flops_per_eval"]
        assert timing["engine_issued_flops_per_eval"] >= needed > 0
        assert timing["flop_ratio_vs_batched_hooked"] > 1
    mix = result["mix"]
    assert abs(sum(mix["weights"].values()) - 1) < 1e-9
    # the mix's rate lies between its families' slowest and fastest
    rates = [t["evals_per_s"]["engine"] for t in families.values()]
    assert min(rates) <= mix["evals_per_s"]["engine"] <= max(rates)
    assert result["max_abs_diff_engine_vs_hooked"] < 1e-3
    n_prompts = result["settings"]["n_agreement_prompts"]
    assert result["n_agreement_masks"] == 3 * n_prompts
    assert len(result["flip_agreement_per_prompt"]) == n_prompts
    assert all(isinstance(row["naive_reply"], str) for row in result["agreement_masks"])
    assert {"prompts", "batched_mean_evals", "sequential_mean_evals"} <= set(result["greedy"])
    parity = result["parity"]
    assert parity["dtypes"] == ["torch.float32", "torch.bfloat16"]
    assert set(parity["families"]) == set(families)
    assert 0 < parity["max_abs_diff"] < float("inf") and 0 <= parity["flip_agreement"] <= 1


def test_an_engine_in_another_dtype_is_a_copy(tiny_llama):
    """Parity scores the same masks on a cast copy: the same precision gives the same
    scores, another moves them, and the engine it was copied from is left as it was."""
    from benchmarks.ablation_throughput import in_dtype

    engine = tiny_engine(tiny_llama, layers=(1, 2))
    cache = engine.prepare(PROMPT)
    features = active_features(engine, cache)
    masks = torch.randint(0, 2, (8, len(features))).float()
    ours = engine.score(cache, features, masks)
    for dtype, same in ((torch.float32, True), (torch.bfloat16, False)):
        other = in_dtype(engine, dtype)
        assert other.lm.dtype == dtype and other.saes[1].W_enc.dtype == dtype
        theirs = other.score(other.prepare(PROMPT), features, masks).float()
        assert torch.equal(ours, theirs) is same and theirs.isfinite().all()
    assert engine.lm.dtype == torch.float32 and engine.saes[1].W_enc.dtype == torch.float32


def test_mix_weights_follow_a_runs_evaluations_per_stage(tmp_path):
    from benchmarks.ablation_throughput import mix, mix_weights
    from refusal.rundir import RunDir

    run = RunDir(tmp_path)
    for stage, evals in [("greedy", 30), ("interactions", 60), ("dormant", 10), ("baseline", 0)]:
        run.append("results.jsonl", {"stage": stage, "prompt_id": 0, "evals": evals})
    timings = {
        f: {
            "n_masks": 1,
            "evals_per_s": dict.fromkeys(("naive", "batched_hooked", "engine"), r),
            "engine_flops_per_eval": 1.0,
            "batched_hooked_flops_per_eval": 3.0,
        }
        for f, r in [("greedy", 1.0), ("fm", 2.0), ("dormant", 4.0)]
    }
    weights = mix_weights(str(tmp_path), timings)
    assert weights == {"greedy": 0.3, "fm": 0.6, "dormant": 0.1}
    # 0.3 / 1 + 0.6 / 2 + 0.1 / 4 seconds per evaluation
    mixed = mix(timings, weights, peak=1.0)
    assert abs(mixed["evals_per_s"]["engine"] - 1 / 0.625) < 1e-9
    assert abs(mixed["flop_ratio_vs_batched_hooked"] - 3.0) < 1e-9
    # one FLOP an evaluation at 1 / 0.625 evaluations a second, against a peak of 1
    assert abs(mixed["mfu"] - 1 / 0.625) < 1e-9


def test_mfu_counts_the_walk_one_token_a_pass(tiny_llama):
    """Where the markers' trie does not branch the engine feeds the next tokens in one pass,
    ahead of rows that may then leave it; MFU counts the FLOPs of the walk one token a pass,
    which gives the same scores."""
    from benchmarks.ablation_throughput import Call, engine_flops

    reply, _ = clean_reply(tiny_llama, 3)
    # an opening that follows the clean reply for two tokens, then leaves it: fed in one
    # pass, the third token's position is computed and never read
    vocab = tiny_llama.model.config.vocab_size
    leaves = [reply[0], reply[1], (reply[2] + 1) % vocab, reply[2]]
    engine = tiny_engine(tiny_llama, layers=(1, 2), openings=Openings.build([leaves]))
    probe = PromptProbe(engine, engine.prepare(PROMPT))
    features = active_features(engine, probe.cache)
    masks = torch.zeros(1, len(features))  # the clean prompt: its greedy reply is `reply`
    issued, needed = engine_flops(engine, probe, Call(features, masks))
    assert issued > needed
    stepwise = tiny_engine(tiny_llama, layers=(1, 2), openings=Openings.build([leaves]).stepwise())
    torch.testing.assert_close(
        stepwise.score(probe.cache, features, masks), probe.score(features, masks)
    )
