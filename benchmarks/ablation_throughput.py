"""Ablation-mask scoring throughput on the search's own masks: the engine against what a
user would write without it.

One process, one refused prompt whose candidates flip it, and the masks the search scores
on it, by family, recorded from the stages' own code through a probe that keeps every
call (`Recorder`):
  greedy    greedy filtering's batches: single removals, then prefixes (stages.greedy)
  fm        the factorization machine's sampled masks around M (refusal.fm.sample_masks)
  dormant   each partial M with a woken latent or a null latent ablated (stages.dormant)
  random    the random control's draws shaped like M (stages.random_control)
Each family's calls are timed three ways, on the same masks:
  naive           per mask: sae-lens splice hooks + HF `generate` (up to `max_new_tokens`,
                  stopping at the end of the turn), the reply judged by refusal markers
  batched_hooked  the same splice, a batch of masks per HF `generate` of the few tokens the
                  opening score reads (judge.Openings): what a careful user writes
  engine          prefix cache (the blocks below the first edited layer run once), sparse
                  latents (only the selected ones re-encoded), rows sharing their early
                  blocks, batched
and the `make run` mix: the families weighted by the evaluations a run made in each stage
(`bench.mix_run`: a run directory, its results.jsonl; else this prompt's own counts).
Plus a matmul peak measured in the same run, the engine's FLOP/s against it (MFU, counting
the FLOPs its scores need: the blocks it runs, its walk one token a pass), the FLOPs
batched_hooked spends on the same masks (their ratio: how much of the speed-up is work
skipped rather than work done faster), peak memory, the flip agreement of engine and naive
on the FM's masks, batched greedy filtering against one-at-a-time elimination, and parity:
every family's masks scored again with the model and SAEs in the other of float32 /
bfloat16 (how far the scores move, how many flip decisions stay). Writes
outputs/bench.json (`bench.out`).

Random weights refuse nothing, so their walk through the markers ends at its first token
and no mask flips anything. `bench.plant_opening` makes them refuse: the unembedding is
edited (refusal.planted.plant_opening) so that their greedy reply to the eval prompts opens
with that refusal marker, and the walk runs its tokens as on a model that refuses.

The run is set up as the search's (refusal.pipeline.setup), and the candidates of a prompt
are the search's own (refusal.stages.greedy.candidates), read off the refusal direction that
the search's direction stage selects (refusal.stages.direction, with `search.direction`).

Settings: conf/bench.yaml, which composes conf/train.yaml (logger=none), so model= / sae= /
layers= / search.* overrides work as for train.py; the benchmark's own are `bench.*`.

    python -m benchmarks.ablation_throughput                          # the organism
    python -m benchmarks.ablation_throughput bench.mix_run=outputs/train/runs/<run>
    # on a GPU: full depth, bf16, the paper's layers, compiled blocks, made to refuse
    python -m benchmarks.ablation_throughput model=gemma2_2b_shape sae=random sae.width=16384 \
        layer=gemma2_paper search.compile=true search.direction.filter_prompts=false \
        'bench.plant_opening="That could seriously endanger people"'
"""

from __future__ import annotations

import copy
import json
import platform
import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from statistics import mean
from typing import Any, TypeVar

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import refusal
from refusal import fm, planted
from refusal.context import Context, Work
from refusal.engine import Engine, PromptProbe
from refusal.features import Feature
from refusal.pipeline import setup
from refusal.records import BaselineRecord, Candidate, PromptResult, Row
from refusal.reference import flipped, hooked_scores, naive_replies
from refusal.rundir import RunDir
from refusal.stages import direction, dormant, greedy, random_control

CONF = str(refusal.PROJECT_ROOT / "conf")
T = TypeVar("T")
# The figures the targets are stated in.
HEADLINE = (
    "ratio_vs_batched_hooked",
    "flop_ratio_vs_batched_hooked",
    "ratio_vs_naive",
    "mfu",
    "peak_rss_gb",
    "flip_agreement",
)


@dataclass
class Call:
    """One engine call of a stage: the features and the masks over them."""

    features: list[Feature]
    masks: torch.Tensor


@dataclass
class Recorder:
    """A probe that scores through the engine and keeps every call (the stages' own masks)."""

    probe: PromptProbe
    calls: list[Call] = field(default_factory=list)

    def score(self, features: list[Feature], masks: torch.Tensor) -> torch.Tensor:
        self.calls.append(Call(list(features), masks.clone()))
        return self.probe.score(features, masks)

    def latents(
        self, features: list[Feature] | None = None, mask: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]:
        return self.probe.latents(features, mask)


def timed(fn: Callable[[], T], n: int) -> tuple[T, float]:
    """Result and evaluations per second of fn() scoring n masks."""
    began = time.perf_counter()
    result = fn()
    _sync()
    return result, n / (time.perf_counter() - began)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak(
    device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10, trials: int = 5
) -> float:
    """Measured dense matmul FLOP/s for this device and dtype: the best of `trials` timings
    (a shared host's clock and neighbours move a single one by ±15 %)."""
    n = 8192 if device.type == "cuda" else n
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(trials):
        _sync()
        began = time.perf_counter()
        for _ in range(repeats):
            a @ b
        _sync()
        best = min(best, time.perf_counter() - began)
    return 2 * n**3 * repeats / best


def counted_flops(fn: Callable[[], object]) -> float:
    """FLOPs of the operations fn() runs (torch's counter: matrix products and attention)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return float(counter.get_total_flops())


def engine_flops(engine: Engine, probe: PromptProbe, call: Call) -> tuple[float, float]:
    """FLOPs of scoring a call's masks on the engine: as the timed run scored them (rows
    that agree on the early layers sharing those blocks; where the markers' trie does not
    branch, its next tokens fed in one pass), and the work those scores need: the same
    with the walk one token a pass, no token fed ahead of a row that then leaves the trie."""
    stepwise = copy.copy(engine)
    stepwise.openings = engine.openings.stepwise()
    issued, needed = (
        counted_flops(partial(e.score, probe.cache, call.features, call.masks))
        for e in (engine, stepwise)
    )
    return issued, needed


def candidates(ctx: Context, prompt_id: int, prompt: str) -> tuple[PromptProbe, list[Candidate]]:
    """The search's candidates for a prompt, and the engine bound to it. Its baseline row is
    left unjudged (no generation): the benchmark reads the probe's clean score instead."""
    baseline = BaselineRecord(
        prompt_id=prompt_id, instruction=prompt, score=float("nan"), reply="", refused=False
    )
    work = Work(ctx, PromptResult(baseline))
    return work.probe, greedy.candidates(ctx, work)


def greedy_comparison(ctx: Context, prompts: list[str]) -> dict:
    """Batched greedy filtering against one-at-a-time elimination, on the search's own
    candidates, for every refused prompt whose candidates flip it."""
    methods = {"batched": greedy.minimal_set, "sequential": greedy.sequential_minimal_set}
    rows = []
    for prompt_id, prompt in enumerate(
        tqdm(prompts, desc="greedy: batched vs one at a time", unit="prompt")
    ):
        probe, found = candidates(ctx, prompt_id, prompt)
        features = [c.feature for c in found]
        if probe.cache.score < ctx.threshold or not features:
            continue
        row: dict[str, Any] = {"n_candidates": len(features)}
        for name, method in methods.items():
            result, rate = timed(partial(method, probe, features, ctx.flip_threshold), 1)
            row[name] = {
                "size": len(result.minimal),
                "evals": result.evals,
                "batches": result.batches,
                "seconds": 1 / rate,
                "one_minimal_by_score": result.one_minimal_by_score,
            }
        if result.flips_all:
            rows.append(row)
    return {"prompts": rows} | {
        f"{name}_mean_{key}": mean([r[name][key] for r in rows]) if rows else None
        for name in methods
        for key in ("evals", "batches", "seconds", "size")
    }


def flip_agreement(ctx: Context, prompts: list[str], bench: DictConfig) -> dict:
    """Engine against naive on the flip decisions the search takes: the FM's own masks
    (its sampler over a prompt's minimal set and extra features), `n_naive` masks on each
    of the first `n_agreement_prompts` refused prompts."""
    c = ctx.cfg.search.fm
    rows, sizes = [], []
    for prompt_id, prompt in enumerate(prompts):
        probe, found = candidates(ctx, prompt_id, prompt)
        if probe.cache.score < ctx.threshold:
            continue
        minimal = greedy.minimal_set(probe, [c.feature for c in found], ctx.flip_threshold).minimal
        extra = fm.extra_features(minimal, found, probe.latents(), c.max_extra)
        masks = fm.sample_masks(bench.n_naive, len(minimal), len(extra), c.p_extra, ctx.cfg.seed)
        features = minimal + extra
        replies = naive_replies(ctx.engine, prompt, features, masks, bench.max_new_tokens)
        scores = probe.score(features, masks).tolist()
        rows += [
            {"prompt": prompt, "naive_flip": f, "engine_score": s, "naive_reply": r}
            for f, s, r in zip(flipped(replies), scores, replies)
        ]
        sizes.append(len(minimal))
        if len(sizes) == bench.n_agreement_prompts:
            break
    naive = [r["naive_flip"] for r in rows]
    engine_scores = torch.tensor([r["engine_score"] for r in rows])
    engine_flips, n = (engine_scores < ctx.flip_threshold).tolist(), bench.n_naive
    return {
        "flip_agreement": agreement(naive, engine_flips),
        "flip_agreement_per_prompt": [
            agreement(naive[i : i + n], engine_flips[i : i + n]) for i in range(0, len(rows), n)
        ],
        "flip_agreement_at_threshold": agreement(naive, (engine_scores < ctx.threshold).tolist()),
        "n_flips_naive": sum(naive),
        "n_flips_engine": sum(engine_flips),
        "n_agreement_masks": len(rows),
        "minimal_set_sizes": sizes,
        "agreement_masks": rows,
    }


@dataclass
class Families:
    """The masks each stage scores on one prompt, and the M they were drawn around."""

    prompt_id: int
    prompt: str
    probe: PromptProbe
    minimal: list[Feature]
    minimal_is_real: bool  # greedy's own M; false: a stand-in (the model refuses nothing)
    calls: dict[str, list[Call]]


def families(ctx: Context, prompts: list[str]) -> Families:
    """The search's masks by family, on the first prompt whose candidates flip it (greedy,
    FM, dormant and random control run as the stages run them). Where none does (random
    weights refuse nothing), the first prompt, with its first four candidates standing in
    for M, so that the masks keep their shapes."""
    fallback = None
    for prompt_id, prompt in enumerate(prompts):
        probe, found = candidates(ctx, prompt_id, prompt)
        greedy_calls = Recorder(probe)
        features = [c.feature for c in found]
        minimal = greedy.minimal_set(greedy_calls, features, ctx.flip_threshold).minimal
        if minimal:
            return _around(ctx, prompt_id, prompt, probe, found, minimal, True, greedy_calls.calls)
        if fallback is None and found:
            fallback = prompt_id, prompt, probe, found, features[:4], False, greedy_calls.calls
    if fallback is None:
        raise RuntimeError("no eval prompt has a candidate feature to benchmark on")
    return _around(ctx, *fallback)


def _around(
    ctx: Context,
    prompt_id: int,
    prompt: str,
    probe: PromptProbe,
    found: list[Candidate],
    minimal: list[Feature],
    real: bool,
    greedy_calls: list[Call],
) -> Families:
    """The stages' masks around M, drawn as the stages draw them (`found`: the candidates)."""
    search, seed = ctx.cfg.search, ctx.cfg.seed
    clean = probe.latents()
    extra = fm.extra_features(minimal, found, clean, search.fm.max_extra)
    fm_masks = fm.sample_masks(
        search.fm.n_masks, len(minimal), len(extra), search.fm.p_extra, seed + prompt_id
    )
    dormant_calls = Recorder(probe)
    settings = dormant.Settings.of(search.dormant)
    dormant.find(dormant_calls, minimal, list(ctx.engine.saes), settings, clean)
    r = search.controls.random
    draws = random_control.draws(
        clean,
        minimal,
        r.n_draws,
        r.min_activation,
        random_control.seeded(seed, prompt_id),
    )
    calls = {
        "greedy": greedy_calls,
        "fm": [Call(minimal + extra, fm_masks)],
        "dormant": dormant_calls.calls,
        "random": [Call(*random_control.masks_for(draws))] if draws else [],
    }
    return Families(prompt_id, prompt, probe, minimal, real, {k: v for k, v in calls.items() if v})


def time_family(ctx: Context, fam: Families, name: str, batch: int, bench: DictConfig) -> dict:
    """Seconds for each way of scoring a family's masks, its masks' FLOPs on the engine,
    and the naive rate on up to `bench.n_naive` of its masks spread over its calls."""
    engine, probe, calls = ctx.engine, fam.probe, fam.calls[name]
    n = sum(len(c.masks) for c in calls)

    def each(method: str) -> Iterable[Call]:
        return tqdm(calls, desc=f"{name} masks, {method}", unit="call", leave=False)

    engine_scores, engine_rate = timed(
        lambda: [probe.score(c.features, c.masks) for c in each("engine")], n
    )
    hooked, hooked_rate = timed(
        lambda: [
            hooked_scores(engine, fam.prompt, c.features, c.masks, batch)
            for c in each("batched_hooked")
        ],
        n,
    )
    spread = [(k, i) for k, c in enumerate(calls) for i in range(len(c.masks))]
    picks = [spread[int(j)] for j in torch.linspace(0, len(spread) - 1, min(bench.n_naive, n))]
    naive_masks = [
        (calls[k], [i for c, i in picks if c == k]) for k in dict.fromkeys(k for k, _ in picks)
    ]
    _, naive_rate = timed(
        lambda: [
            naive_replies(engine, fam.prompt, c.features, c.masks[rows], bench.max_new_tokens)
            for c, rows in naive_masks
        ],
        len(picks),
    )
    issued, needed = (sum(f) for f in zip(*(engine_flops(engine, probe, c) for c in calls)))
    hooked_flops = sum(
        counted_flops(partial(hooked_scores, engine, fam.prompt, c.features, c.masks, batch))
        for c in calls
    )
    return {
        "n_masks": n,
        "n_calls": len(calls),
        "evals_per_s": {"naive": naive_rate, "batched_hooked": hooked_rate, "engine": engine_rate},
        "ratio_vs_batched_hooked": engine_rate / hooked_rate,
        "ratio_vs_naive": engine_rate / naive_rate,
        # FLOPs per evaluation: the work the engine's scores need (MFU counts these), what
        # it issued (tokens fed ahead of rows that leave the trie too), and batched_hooked's
        "engine_flops_per_eval": needed / n,
        "engine_issued_flops_per_eval": issued / n,
        "batched_hooked_flops_per_eval": hooked_flops / n,
        "flop_ratio_vs_batched_hooked": hooked_flops / needed,
        "max_abs_diff_engine_vs_hooked": max(
            (a - b).abs().max().item() for a, b in zip(engine_scores, hooked)
        ),
    }


# the methods whose FLOPs are counted
COUNTED = ("engine", "batched_hooked")

# the stage whose evaluations (results.jsonl `evals`) each family stands for
STAGE_OF = {
    "greedy": "greedy",
    "fm": "interactions",
    "dormant": "dormant",
    "random": "random_control",
}


def mix_weights(run_dir: str | None, timings: dict[str, dict]) -> dict[str, float]:
    """Each family's share of a run's evaluations: summed per stage over a run directory's
    results.jsonl, or (no run given) the benchmark prompt's own mask counts."""
    if run_dir is None:
        counts = {name: float(t["n_masks"]) for name, t in timings.items()}
    else:
        rows = [Row.model_validate(row) for row in RunDir(run_dir).read("results.jsonl")]
        counts = {
            name: float(sum(r.evals for r in rows if r.stage == STAGE_OF[name])) for name in timings
        }
    total = sum(counts.values())
    return {name: c / total for name, c in counts.items()}


def mix(timings: dict[str, dict], weights: dict[str, float], peak: float) -> dict:
    """The families as a run mixes them: seconds per evaluation weighted by each family's
    share, for every method, and the engine's utilisation over the mix."""
    per_eval = {
        method: sum(w / timings[f]["evals_per_s"][method] for f, w in weights.items())
        for method in ("naive", "batched_hooked", "engine")
    }
    flops = {
        method: sum(w * timings[f][f"{method}_flops_per_eval"] for f, w in weights.items())
        for method in COUNTED
    }
    return {
        "weights": weights,
        "evals_per_s": {method: 1 / s for method, s in per_eval.items()},
        "ratio_vs_batched_hooked": per_eval["batched_hooked"] / per_eval["engine"],
        "ratio_vs_naive": per_eval["naive"] / per_eval["engine"],
        "flop_ratio_vs_batched_hooked": flops["batched_hooked"] / flops["engine"],
        **utilisation(flops, {m: 1 / per_eval[m] for m in COUNTED}, peak),
    }


def utilisation(flops: dict[str, float], evals_per_s: dict[str, float], peak: float) -> dict:
    """MFU of the engine (the FLOPs its scores need) and of batched_hooked, per second
    against the matmul peak."""
    mfu = {m: flops[m] * evals_per_s[m] / peak for m in COUNTED}
    return {"mfu": mfu["engine"], "batched_hooked_mfu": mfu["batched_hooked"]}


def in_dtype(engine: Engine, dtype: torch.dtype) -> Engine:
    """The same engine with its model and SAEs cast to `dtype` (copies, not compiled)."""
    # transformers wraps `to` in functools.wraps(nn.Module.to), which mypy reads as unbound
    model = copy.deepcopy(engine.lm.model).to(dtype)  # type: ignore[arg-type]
    lm = replace(engine.lm, model=model, compiled=None)
    saes = {layer: copy.deepcopy(sae).to(dtype=dtype) for layer, sae in engine.saes.items()}
    return Engine(lm, saes, engine.intervention, engine.batch_size, openings=engine.openings)


def parity(ctx: Context, fam: Families) -> dict:
    """Every family's masks scored with the model and SAEs in the other of float32 /
    bfloat16 against the run's own precision: how far the opening scores move, and how
    many flip decisions (score below the flip threshold) stay the same."""
    dtype = torch.bfloat16 if ctx.lm.dtype == torch.float32 else torch.float32
    other = in_dtype(ctx.engine, dtype)
    probe = PromptProbe(other, other.prepare(fam.prompt))
    per_family, flips = {}, []
    for name, calls in fam.calls.items():
        ours = torch.cat([fam.probe.score(c.features, c.masks) for c in calls]).float()
        theirs = torch.cat([probe.score(c.features, c.masks) for c in calls]).float()
        same = ((ours < ctx.flip_threshold) == (theirs < ctx.flip_threshold)).tolist()
        flips += same
        per_family[name] = {
            "max_abs_diff": (ours - theirs).abs().max().item(),
            "mean_abs_diff": (ours - theirs).abs().mean().item(),
            "flip_agreement": mean(same),
        }
    return {
        "dtypes": [str(ctx.lm.dtype), str(dtype)],
        "clean_score": [fam.probe.cache.score, probe.cache.score],
        "max_abs_diff": max(f["max_abs_diff"] for f in per_family.values()),
        "flip_agreement": mean(flips),
        "families": per_family,
    }


def run(cfg: DictConfig) -> dict:
    ctx = setup(cfg)
    engine, lm, bench = ctx.engine, ctx.lm, cfg.bench
    if bench.plant_opening:
        fitted = ctx.prompts.eval[: bench.plant_prompts]
        planted.plant_opening(lm, bench.plant_opening, fitted)
    direction.run(ctx)
    fam = families(ctx, ctx.prompts.eval)
    batch = engine.batch_size
    timings = {name: time_family(ctx, fam, name, batch, bench) for name in fam.calls}
    peak = matmul_peak(lm.device, lm.dtype)
    for t in timings.values():
        flops = {m: t[f"{m}_flops_per_eval"] for m in COUNTED}
        t |= utilisation(flops, t["evals_per_s"], peak)
    mixed = mix(timings, mix_weights(bench.mix_run, timings), peak)
    agreed = flip_agreement(ctx, ctx.prompts.eval[bench.prompt :], bench)
    return {
        "ratio_vs_batched_hooked": mixed["ratio_vs_batched_hooked"],
        "flop_ratio_vs_batched_hooked": mixed["flop_ratio_vs_batched_hooked"],
        "ratio_vs_naive": mixed["ratio_vs_naive"],
        "mfu": mixed["mfu"],
        "mix": mixed,
        "families": timings,
        "matmul_peak_flops_per_s": peak,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else None,
        **agreed,
        # over every family's masks, from the timed scoring itself
        "max_abs_diff_engine_vs_hooked": max(
            t["max_abs_diff_engine_vs_hooked"] for t in timings.values()
        ),
        "greedy": greedy_comparison(ctx, ctx.prompts.eval[: bench.n_greedy]),
        "parity": parity(ctx, fam) if bench.parity else None,
        "prompt_id": fam.prompt_id,
        # the benchmark prompt's clean greedy opening: what the walk follows
        "clean_reply": ctx.forwards.generate([fam.prompt], max_new_tokens=16)[0],
        "minimal_set": [str(f) for f in fam.minimal],
        "minimal_set_is_real": fam.minimal_is_real,
        "batch_size": batch,
        "prompt_tokens": fam.probe.cache.input_ids.shape[1],
        "model": cfg.model.name,
        "layers": list(cfg.layers),
        "sae_width": {layer: sae.cfg.d_sae for layer, sae in engine.saes.items()},
        "device": torch.cuda.get_device_name()
        if lm.device.type == "cuda"
        else platform.processor() or "cpu",
        "dtype": str(lm.dtype),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def agreement(a: list[bool], b: list[bool]) -> float | None:
    """Share of equal decisions (None where there are none: e.g. random weights refuse
    no prompt)."""
    return sum(x == y for x, y in zip(a, b)) / len(a) if a else None


def overrides() -> list[str]:
    """The command line's overrides (none when the config was composed without Hydra's
    runtime)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def bench(cfg: DictConfig) -> dict:
    """Run the benchmark; write its figures to `bench.out` and print the headline ones."""
    settings = OmegaConf.to_container(cfg.bench, resolve=True)
    result = run(cfg) | {"settings": settings, "overrides": overrides()}
    result["headline"] = {k: result[k] for k in HEADLINE}
    out = Path(cfg.bench.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["headline"], indent=2))
    print(f"wrote {out}")
    return result


@hydra.main(version_base="1.3", config_path=CONF, config_name="bench")
def main(cfg: DictConfig) -> dict:
    return bench(cfg)


if __name__ == "__main__":
    main()
