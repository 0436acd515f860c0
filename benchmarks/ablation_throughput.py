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
prompts. Writes outputs/bench.json.

    python benchmarks/ablation_throughput.py                          # the organism
    python benchmarks/ablation_throughput.py model=gemma2_2b_shape sae=random sae.width=16384 \
        'layers=[2]' model.config.num_hidden_layers=4 model.config.vocab_size=49152
    # on a GPU: full depth, bf16, the paper's layers, compiled blocks
    python benchmarks/ablation_throughput.py model=gemma2_2b_shape sae=random sae.width=16384 \
        layer=gemma2_paper search.compile=true n_masks=4096
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from functools import partial
from pathlib import Path
from statistics import mean

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import refusal
from refusal import data, direction, fm, greedy, judge, models, saes
from refusal.engine import Ablation, Engine, Feature, PromptProbe
from refusal.models import Edit

CONF = Path(refusal.__file__).resolve().parent.parent / "conf"
# The figures the targets are stated in.
HEADLINE = (
    "engine_evals_per_s",
    "naive_evals_per_s",
    "ratio_vs_naive",
    "mfu",
    "peak_rss_gb",
    "flip_agreement",
)
DEFAULTS = {
    "n_masks": 256,
    "n_naive": 32,  # naive evaluations for the throughput, and per prompt for the agreement
    "n_agreement_prompts": 4,
    "n_features": 24,
    "max_new_tokens": 48,
    "prompt": 0,
    "n_greedy": 8,  # eval prompts for batched vs one-at-a-time greedy filtering
}


def splice_edit(engine: Engine, features: list[Feature], masks: torch.Tensor) -> Edit:
    """sae-lens's full encode/decode splice, error term kept:
    h ← decode(edit(encode(h))) + (h − decode(encode(h))), row b ablating masks[b]."""
    strength, device = engine.ablation.strength, engine.lm.device
    by_layer = {}
    for layer in engine.saes:
        cols = [i for i, f in enumerate(features) if f.layer == layer]
        idx = torch.tensor([features[i].latent for i in cols], dtype=torch.long, device=device)
        weight = masks[:, cols].to(device=device, dtype=engine.lm.dtype).unsqueeze(1)
        by_layer[layer] = idx, weight * strength

    def edit(layer: int, h: torch.Tensor) -> torch.Tensor:
        sae, (idx, weight) = engine.saes[layer], by_layer[layer]
        z = sae.encode(h)
        edited = z.clone()
        rows = min(len(weight), len(h))
        edited[..., idx] = z[..., idx] * (1 - weight[:rows])
        return sae.decode(edited) + (h - sae.decode(z))

    return edit


def naive_replies(engine: Engine, prompt: str, features, masks, max_new_tokens: int) -> list[str]:
    batch = engine.lm.tokenize([prompt])
    replies = []
    for mask in tqdm(masks, desc="naive (hooks + generation)", unit="mask"):
        edit = splice_edit(engine, features, mask[None])
        with engine.hooked(edit, engine.saes), torch.no_grad():
            out = engine.lm.model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                eos_token_id=None,  # the reference's cost, always N tokens; nor is EOS banned
                do_sample=False,
                pad_token_id=engine.lm.tokenizer.pad_token_id,
            )
        replies.append(assistant_turn(engine.lm, out[0, batch["input_ids"].shape[1] :]))
    return replies


def assistant_turn(lm: models.LM, reply_ids: torch.Tensor) -> str:
    """The text of a generated reply up to the end of the assistant's turn."""
    ends = torch.isin(reply_ids, torch.tensor(lm.end_of_turn_ids, device=reply_ids.device))
    cut = int(ends.nonzero()[0]) if ends.any() else len(reply_ids)
    return lm.tokenizer.decode(reply_ids[:cut], skip_special_tokens=True)


def flipped(replies: list[str]) -> list[bool]:
    """The naive judge's decisions: no refusal marker in the reply."""
    return [not judge.is_refusal(reply) for reply in replies]


def hooked_scores(engine: Engine, prompt: str, features, masks, batch_size: int) -> torch.Tensor:
    """Opening scores from HF's own forward and greedy generate, sae-lens's splice hooked in."""
    batch = engine.lm.tokenize([prompt])
    scores = []
    for i in range(0, len(masks), batch_size):
        chunk = masks[i : i + batch_size]
        with engine.hooked(splice_edit(engine, features, chunk), engine.saes), torch.no_grad():
            out = engine.lm.model.generate(
                **{k: v.expand(len(chunk), -1) for k, v in batch.items()},
                max_new_tokens=engine.openings.depth,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=engine.lm.tokenizer.pad_token_id,
            )
        scores.append(replayed_scores(engine.openings, out, batch["input_ids"].shape[1]).cpu())
    return torch.cat(scores)


def replayed_scores(openings: judge.Openings, out, prompt_len: int) -> torch.Tensor:
    """Opening scores of a greedy `generate` output, its logits replayed to the walk."""
    rows, steps = torch.arange(len(out.sequences)), iter(enumerate(out.logits[1:], prompt_len))

    def next_logits(keep: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        nonlocal rows
        rows = rows[keep.cpu()]
        position, logits = next(steps)
        assert torch.equal(out.sequences[rows, position], tokens), "walk left the greedy path"
        return logits[rows]

    return openings.score(out.logits[0], next_logits)


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


def pick_features(engine: Engine, cache, n: int) -> list[Feature]:
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


def refusal_directions(engine: Engine, cfg: DictConfig) -> torch.Tensor:
    n = cfg.data.n_train
    return direction.mean_diff(
        engine,
        data.load_source(cfg.data.harmful_train)[:n],
        data.load_source(cfg.data.harmless_train)[:n],
    )


def candidates(
    engine: Engine, cfg: DictConfig, prompt: str, directions: torch.Tensor
) -> tuple[PromptProbe, list[Feature]]:
    """The search's candidates for a prompt: latents aligned with each SAE layer's
    difference-of-means direction at the last post-instruction token, active on the prompt."""
    probe = PromptProbe(engine, engine.prepare(prompt))
    position = direction.post_instruction_positions(engine.lm)[-1]
    c = cfg.search.candidates
    found = direction.candidates(
        engine, directions, position, probe.latents(), c.top_k, c.cos_floor, c.min_activation
    )
    return probe, [f for f, _ in found]


def greedy_comparison(
    engine: Engine, cfg: DictConfig, prompts: list[str], directions: torch.Tensor
) -> dict:
    """Batched greedy filtering against one-at-a-time elimination, on the search's own
    candidates, for every refused prompt whose candidates flip it."""
    threshold = cfg.judge.threshold - cfg.judge.flip_margin
    methods = {"batched": greedy.minimal_set, "sequential": greedy.sequential_minimal_set}
    rows = []
    for prompt in tqdm(prompts, desc="greedy: batched vs one at a time", unit="prompt"):
        probe, features = candidates(engine, cfg, prompt, directions)
        if probe.cache.score < cfg.judge.threshold or not features:
            continue
        row = {"n_candidates": len(features)}
        for name, method in methods.items():
            result, rate = timed(partial(method, probe, features, threshold), 1)
            row[name] = {
                "size": len(result.minimal),
                "evals": result.evals,
                "batches": result.batches,
                "seconds": 1 / rate,
                "one_minimal": result.one_minimal,
            }
        if result.flips_all:
            rows.append(row)
    return {"prompts": rows} | {
        f"{name}_mean_{key}": mean([r[name][key] for r in rows]) if rows else None
        for name in methods
        for key in ("evals", "batches", "seconds", "size")
    }


def flip_agreement(
    engine: Engine, cfg: DictConfig, prompts: list[str], directions: torch.Tensor, settings: dict
) -> dict:
    """Engine against naive on the flip decisions the search takes: the FM's own masks
    (its sampler over a prompt's minimal set and extra features), `n_naive` masks on each
    of the first `n_agreement_prompts` refused prompts."""
    threshold = cfg.judge.threshold - cfg.judge.flip_margin
    c = cfg.search.fm
    rows, sizes = [], []
    for prompt in prompts:
        probe, found = candidates(engine, cfg, prompt, directions)
        if probe.cache.score < cfg.judge.threshold:
            continue
        minimal = greedy.minimal_set(probe, found, threshold).minimal
        extra = fm.extra_features(minimal, found, probe.latents(), c.max_extra)
        masks = fm.sample_masks(
            settings["n_naive"], len(minimal), len(extra), c.p_minimal, c.p_extra, cfg.seed
        )
        features = minimal + extra
        replies = naive_replies(engine, prompt, features, masks, settings["max_new_tokens"])
        scores = probe.score(features, masks).tolist()
        rows += [
            {"prompt": prompt, "naive_flip": f, "engine_score": s, "naive_reply": r}
            for f, s, r in zip(flipped(replies), scores, replies)
        ]
        sizes.append(len(minimal))
        if len(sizes) == settings["n_agreement_prompts"]:
            break
    naive = [r["naive_flip"] for r in rows]
    scores = torch.tensor([r["engine_score"] for r in rows])
    engine_flips, n = (scores < threshold).tolist(), settings["n_naive"]
    return {
        "flip_agreement": agreement(naive, engine_flips),
        "flip_agreement_per_prompt": [
            agreement(naive[i : i + n], engine_flips[i : i + n]) for i in range(0, len(rows), n)
        ],
        "flip_agreement_at_threshold": agreement(naive, (scores < cfg.judge.threshold).tolist()),
        "n_flips_naive": sum(naive),
        "n_flips_engine": sum(engine_flips),
        "n_agreement_masks": len(rows),
        "minimal_set_sizes": sizes,
        "agreement_masks": rows,
    }


def run(overrides: list[str], settings: dict) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    lm = models.load(cfg.model, seed=cfg.seed)
    engine = Engine(
        lm,
        saes.load(cfg.sae, lm, list(cfg.layers), seed=cfg.seed),
        judge.refusal_token_ids(lm.tokenizer, list(cfg.model.refusal_tokens)),
        Ablation(**cfg.search.ablation),
        compile=cfg.search.compile,
    )
    prompt = data.load_source(cfg.data.eval)[settings["prompt"]]
    cache = engine.prepare(prompt)
    features = pick_features(engine, cache, settings["n_features"])
    masks = mixed_masks(settings["n_masks"], len(features))
    batch = engine.tune_batch_size(cache, features)
    n_small = min(32, len(masks))
    naive_masks = masks[torch.linspace(0, len(masks) - 1, settings["n_naive"]).long()]

    scores, engine_rate = timed(lambda: engine.score(cache, features, masks), len(masks))
    _, cached_rate = timed(lambda: _unbatched(engine, cache, features, masks[:n_small]), n_small)
    batched, batched_rate = timed(
        lambda: hooked_scores(engine, prompt, features, masks, batch), len(masks)
    )
    _, full_rate = timed(
        lambda: hooked_scores(engine, prompt, features, masks[:n_small], 1), n_small
    )
    replies, naive_rate = timed(
        lambda: naive_replies(engine, prompt, features, naive_masks, settings["max_new_tokens"]),
        len(naive_masks),
    )

    naive_scores = engine.score(cache, features, naive_masks)
    engine_flips = (naive_scores < cfg.judge.threshold - cfg.judge.flip_margin).tolist()
    directions = refusal_directions(engine, cfg)
    eval_prompts = data.load_source(cfg.data.eval)
    agreed = flip_agreement(engine, cfg, eval_prompts[settings["prompt"] :], directions, settings)
    greedy_cmp = greedy_comparison(engine, cfg, eval_prompts[: settings["n_greedy"]], directions)
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


def _unbatched(engine: Engine, cache, features, masks) -> torch.Tensor:
    return torch.cat([engine.score(cache, features, m[None]) for m in masks])


def main(argv: list[str]) -> None:
    settings, overrides, out = dict(DEFAULTS), [], Path("outputs/bench.json")
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in settings:
            settings[key] = int(value)
        elif key == "out":
            out = Path(value)
        else:
            overrides.append(arg)
    result = run(overrides, settings) | {"settings": settings, "overrides": overrides}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(
        json.dumps(
            {k: result[k] for k in HEADLINE},
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
