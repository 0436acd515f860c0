"""Ablation-mask scoring throughput: the engine against the naive reference, side by side.

One process, the same prompt and masks for every variant:
  naive                   per mask: full forward with sae-lens splice hooks + 48-token greedy
                          generation, the assistant's turn judged by refusal markers (how
                          earlier tooling works); the splice covers the positions the search
                          ablates (search.ablation)
  full_forward            per mask: hooked full forward + greedy decoding of the few tokens
                          the opening score reads (judge.Openings)
  batched_full_forward    a batch of masks in one hooked full forward and decoding
  prefix_cached           the engine with batch size 1 (prefix cache + sparse latents)
  engine                  the engine: prefix cache, sparse latents, batched masks
plus a matmul peak measured in the same run, the engine's FLOP/s against it (MFU, counting
the FLOPs of the layers actually run) and peak memory; the flip agreement of engine and naive
on the masks the search itself scores (the FM's sampler around the prompt's minimal set); and
batched greedy filtering against one-at-a-time elimination on the first `n_greedy` eval
prompts. The naive reference is refusal.reference's. Writes outputs/bench.json (`bench.out`).

The run is set up as the search's (refusal.pipeline.setup), and the candidates of a prompt
are the search's own (refusal.stages.greedy.candidates), read off the refusal direction that
the search's direction stage selects (refusal.stages.direction, with `search.direction`):
more faithful than a fixed direction, at the cost of that stage's selection passes.

Settings: conf/bench.yaml, which composes conf/train.yaml (logger=none), so model= / sae= /
layers= / search.* overrides work as for train.py; the benchmark's own are `bench.*`.

    python -m benchmarks.ablation_throughput                          # the organism
    python -m benchmarks.ablation_throughput model=gemma2_2b_shape sae=random sae.width=16384 \
        'layers=[2]' model.config.num_hidden_layers=4 model.config.vocab_size=49152
    # on a GPU: full depth, bf16, the paper's layers, compiled blocks
    python -m benchmarks.ablation_throughput model=gemma2_2b_shape sae=random sae.width=16384 \
        layer=gemma2_paper search.compile=true bench.n_masks=4096
"""

from __future__ import annotations

import json
import platform
import resource
import time
from functools import partial
from pathlib import Path
from statistics import mean

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import refusal
from refusal import fm
from refusal.context import Context, Work
from refusal.engine import Engine, PromptCache, PromptProbe
from refusal.features import Feature
from refusal.pipeline import setup
from refusal.records import BaselineRecord, PromptResult
from refusal.reference import flipped, hooked_scores, naive_replies
from refusal.stages import direction, greedy

CONF = str(refusal.PROJECT_ROOT / "conf")
# The figures the targets are stated in.
HEADLINE = (
    "engine_evals_per_s",
    "naive_evals_per_s",
    "ratio_vs_naive",
    "mfu",
    "peak_rss_gb",
    "flip_agreement",
)


def timed(fn, n: int) -> tuple[object, float]:
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


def flops_per_eval(engine: Engine, cache, features, masks: torch.Tensor) -> float:
    """Mean FLOPs of scoring one of `masks` (distinct rows), as the timed run scored them:
    in batches, rows that agree on the early layers sharing those blocks."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        engine.score(cache, features, masks)
    return counter.get_total_flops() / len(masks)


def pick_features(engine: Engine, cache: PromptCache, n: int) -> list[Feature]:
    """The most active latents of the prompt, spread evenly over the SAE layers."""
    latents = engine.latents(cache)
    per_layer = max(1, n // len(latents))
    return [
        Feature(layer, int(i))
        for layer, z in latents.items()
        for i in z.max(0).values.topk(per_layer).indices
    ]


def mixed_masks(n: int, n_features: int, seed: int = 0) -> torch.Tensor:
    """Distinct masks from sparse to dense: row r ablates each feature with probability
    r/n (repeats dropped, since the engine scores a repeated row once)."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.linspace(0, 1, n).unsqueeze(1).expand(n, n_features)
    rows = {tuple(row): None for row in torch.bernoulli(p, generator=gen).tolist()}
    return torch.tensor(list(rows))


def candidates(ctx: Context, prompt_id: int, prompt: str) -> tuple[PromptProbe, list[Feature]]:
    """The search's candidates for a prompt, and the engine bound to it. Its baseline row is
    left unjudged (no generation): the benchmark reads the probe's clean score instead."""
    baseline = BaselineRecord(
        prompt_id=prompt_id, instruction=prompt, score=float("nan"), reply="", refused=False
    )
    work = Work(ctx, PromptResult(baseline))
    return work.probe, [c.feature for c in greedy.candidates(ctx, work)]


def greedy_comparison(ctx: Context, prompts: list[str]) -> dict:
    """Batched greedy filtering against one-at-a-time elimination, on the search's own
    candidates, for every refused prompt whose candidates flip it."""
    methods = {"batched": greedy.minimal_set, "sequential": greedy.sequential_minimal_set}
    rows = []
    for prompt_id, prompt in enumerate(
        tqdm(prompts, desc="greedy: batched vs one at a time", unit="prompt")
    ):
        probe, features = candidates(ctx, prompt_id, prompt)
        if probe.cache.score < ctx.threshold or not features:
            continue
        row = {"n_candidates": len(features)}
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
        minimal = greedy.minimal_set(probe, found, ctx.flip_threshold).minimal
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
    scores = torch.tensor([r["engine_score"] for r in rows])
    engine_flips, n = (scores < ctx.flip_threshold).tolist(), bench.n_naive
    return {
        "flip_agreement": agreement(naive, engine_flips),
        "flip_agreement_per_prompt": [
            agreement(naive[i : i + n], engine_flips[i : i + n]) for i in range(0, len(rows), n)
        ],
        "flip_agreement_at_threshold": agreement(naive, (scores < ctx.threshold).tolist()),
        "n_flips_naive": sum(naive),
        "n_flips_engine": sum(engine_flips),
        "n_agreement_masks": len(rows),
        "minimal_set_sizes": sizes,
        "agreement_masks": rows,
    }


def run(cfg: DictConfig) -> dict:
    ctx = setup(cfg)
    engine, lm, bench = ctx.engine, ctx.lm, cfg.bench
    prompt = ctx.prompts.eval[bench.prompt]
    cache = engine.prepare(prompt)
    features = pick_features(engine, cache, bench.n_features)
    masks = mixed_masks(bench.n_masks, len(features))
    batch = engine.tune_batch_size(cache, features)
    n_small = min(32, len(masks))
    naive_masks = masks[torch.linspace(0, len(masks) - 1, bench.n_naive).long()]

    scores, engine_rate = timed(lambda: engine.score(cache, features, masks), len(masks))
    _, cached_rate = timed(lambda: _unbatched(engine, cache, features, masks[:n_small]), n_small)
    batched, batched_rate = timed(
        lambda: hooked_scores(engine, prompt, features, masks, batch), len(masks)
    )
    _, full_rate = timed(
        lambda: hooked_scores(engine, prompt, features, masks[:n_small], 1), n_small
    )
    replies, naive_rate = timed(
        lambda: naive_replies(engine, prompt, features, naive_masks, bench.max_new_tokens),
        len(naive_masks),
    )

    naive_scores = engine.score(cache, features, naive_masks)
    engine_flips = (naive_scores < ctx.flip_threshold).tolist()
    direction.run(ctx)
    agreed = flip_agreement(ctx, ctx.prompts.eval[bench.prompt :], bench)
    greedy_cmp = greedy_comparison(ctx, ctx.prompts.eval[: bench.n_greedy])
    flop_eval = flops_per_eval(engine, cache, features, masks)
    peak = matmul_peak(lm.device, lm.dtype)
    rates = {
        "naive": naive_rate,
        "full_forward": full_rate,
        "batched_full_forward": batched_rate,
        "prefix_cached": cached_rate,
        "engine": engine_rate,
    }
    return {
        "engine_evals_per_s": engine_rate,
        "naive_evals_per_s": naive_rate,
        "ratio_vs_naive": engine_rate / naive_rate,
        "evals_per_s": rates,
        "ratios_vs_naive": {k: v / naive_rate for k, v in rates.items()},
        "mfu": flop_eval * engine_rate / peak,
        "engine_flops_per_eval": flop_eval,
        "engine_flops_per_s": flop_eval * engine_rate,
        "matmul_peak_flops_per_s": peak,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else None,
        **agreed,
        # the throughput masks ablate the prompt's most active latents, most of them at once:
        # far off the search's path, where 48 generated tokens are often degenerate
        "flip_agreement_throughput_masks": agreement(flipped(replies), engine_flips),
        "max_abs_diff_engine_vs_hooked": (scores - batched).abs().max().item(),
        "greedy": greedy_cmp,
        "batch_size": batch,
        "n_masks": len(masks),
        "n_features": len(features),
        "prompt_tokens": cache.input_ids.shape[1],
        "layers_run_after_cache": lm.n_layers - engine.start - 1,
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


def _unbatched(engine: Engine, cache: PromptCache, features, masks) -> torch.Tensor:
    return torch.cat([engine.score(cache, features, m[None]) for m in masks])


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
