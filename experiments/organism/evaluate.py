"""Evaluate the organism and its SAEs; write outputs/organism_eval.json.

    python -m experiments.organism.evaluate [--n-harmless 320] [--out outputs/organism_eval.json]

- prompt_sets.<name>: refusal rate by the generation judge (greedy, 48 new tokens,
  refusal.judge.is_refusal) and by the first-token refusal score (> 0).
- saes.<layer>: L0, FVU, CE-loss recovered with the SAE spliced in and its error term
  dropped, (CE_zero − CE_sae) / (CE_zero − CE_clean) with CE_zero zeroing the residual at
  that layer, and the fraction of latents never active; on held-out chat texts (prompt +
  the organism's reply). Special tokens (the attention-sink <|im_start|> / <|im_end|>,
  which the SAEs never trained on) are left unspliced and unscored.
- direction_ablation: the difference-of-means refusal direction (refusal.direction) at
  the last prompt position, chosen by bypass score on harmful_val.json; ablated at one
  layer only and at every layer (plus the embeddings), harmful refusal rates.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from tqdm import tqdm

import refusal  # noqa: F401  (registers the config resolvers)
from experiments.organism.common import ROOT, SEED, data_file, sample, write_json
from refusal import data, models
from refusal import saes as sae_loading
from refusal.direction import ablation_edits, mean_diff, post_instruction_positions
from refusal.engine import Engine
from refusal.judge import is_refusal, refusal_token_ids
from refusal.models import LM

HARMFUL_SETS = ("jailbreakbench", "harmbench_test", "builtin_harmful_eval")


def compose_cfg(overrides: list[str] | None = None):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "model=smollm2_organism",
                "sae=organism",
                "layer=organism",
                *(overrides or []),
            ],
        )


def prompt_sets(n_harmless: int) -> dict[str, list[str]]:
    return {
        "jailbreakbench": data_file("jailbreakbench"),
        "harmbench_test": data_file("harmbench_test"),
        "builtin_harmful_eval": data.builtin("harmful", "eval"),
        "harmless_val": sample(data_file("harmless_val"), n_harmless, SEED),
        "builtin_harmless_eval": data.builtin("harmless", "eval"),
    }


# -- generation, with optional residual edits inside HF generate -----------------------


@contextmanager
def edited(lm: LM, edit, embed_edit=None, layers=None) -> Iterator[None]:
    """Apply edit(L, h) to the output of blocks `layers` (all by default) and embed_edit to
    the embeddings, at every position, prompt and generated tokens alike."""
    layers = range(lm.n_layers) if layers is None else layers
    handles = [
        lm.blocks[layer].register_forward_hook(lambda m, a, out, layer=layer: edit(layer, out))
        for layer in layers
    ]
    if embed_edit is not None:
        handles.append(
            lm.model.get_input_embeddings().register_forward_hook(lambda m, a, out: embed_edit(out))
        )
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def generate(
    engine: Engine,
    prompts: list[str],
    max_new_tokens: int = 48,
    batch_size: int = 32,
    desc: str = "generate",
) -> list[str]:
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[start : start + batch_size]
        for i, reply in zip(
            idx, engine.generate([prompts[i] for i in idx], max_new_tokens=max_new_tokens)
        ):
            replies[i] = reply
    return replies


def refusal_rates(
    engine: Engine,
    prompts: list[str],
    generation: bool = True,
    desc: str = "",
    edit=None,
    embed_edit=None,
    layers=None,
) -> dict:
    out = {"n": len(prompts)}
    scores = engine.refusal_scores(prompts, edit, embed_edit)
    out["refusal_rate_first_token"] = (scores > 0).float().mean().item()
    if generation:
        if edit is None:
            replies = generate(engine, prompts, desc=desc)
        else:
            with edited(engine.lm, edit, embed_edit, layers):
                replies = generate(engine, prompts, desc=desc)
        out["refusal_rate"] = sum(map(is_refusal, replies)) / len(prompts)
        out["replies"] = replies
    return out


# -- SAE quality -----------------------------------------------------------------------


def summed_ce(lm: LM, ids: torch.Tensor, target_ok: torch.Tensor, h_final: torch.Tensor) -> float:
    """Summed next-token cross-entropy over the positions target_ok marks."""
    logits = lm.next_token_logits(h_final[:, :-1][target_ok])
    return torch.nn.functional.cross_entropy(
        logits.float(), ids[:, 1:][target_ok], reduction="sum"
    ).item()


def keep_hidden(store: dict, layers: set, layer: int, h: torch.Tensor) -> torch.Tensor:
    """A run_blocks edit that records the residual at `layers` and changes nothing."""
    if layer in layers:
        store[layer] = h
    return h


@torch.no_grad()
def sae_metrics(
    lm: LM, saes: dict, texts: list[str], n_ce: int = 128, batch_size: int = 16
) -> dict:
    """L0, FVU and dead latents over every text; CE loss recovered over the first `n_ce`.

    Dead means never active on any of the texts' tokens: the more tokens, the fewer
    rare latents are mistaken for dead ones. The CE splices (two extra partial forwards
    per SAE) are the costly part, hence their smaller sample.
    """
    tok = lm.tokenizer
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    stats = {
        layer: dict(
            n=0,
            l0=0.0,
            err=0.0,
            sq=0.0,
            sum=torch.zeros(lm.d_model, dtype=torch.float64),
            active=torch.zeros(sae.cfg.d_sae, dtype=torch.bool),
            ce_sae=0.0,
            ce_zero=0.0,
            n_ce=0,
        )
        for layer, sae in saes.items()
    }
    ce_clean, n_targets = 0.0, 0
    tok.padding_side = "left"
    for i in tqdm(range(0, len(texts), batch_size), desc="SAE metrics", unit="batch"):
        batch = tok(
            texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        )
        ids, mask = batch["input_ids"], batch["attention_mask"]
        keep = mask.bool() & ~torch.isin(ids, special)  # positions spliced and scored
        target_ok = (mask[:, :-1] * mask[:, 1:]).bool()

        ce = partial(summed_ce, lm, ids, target_ok)
        with_ce = i < n_ce
        hidden = {}
        record = partial(keep_hidden, hidden, set(saes))
        h_final = lm.run_blocks(lm.embed(ids), 0, attention_mask=mask, edit=record)
        if with_ce:
            ce_clean += ce(h_final)
            n_targets += int(target_ok.sum())
        for layer, sae in saes.items():
            s, h = stats[layer], hidden[layer]
            x = h[keep]
            z = sae.encode(x.to(sae.dtype))
            recon = sae.decode(z).to(h.dtype)
            s["n"] += len(x)
            s["l0"] += (z > 0).sum().item()
            s["err"] += (x - recon).double().pow(2).sum().item()
            s["sq"] += x.double().pow(2).sum().item()
            s["sum"] += x.double().sum(0)
            s["active"] |= (z > 0).any(0)
            if not with_ce:
                continue
            s["n_ce"] += int(keep.sum())
            spliced, zeroed = h.clone(), h.clone()
            spliced[keep] = recon
            zeroed[keep] = 0.0
            s["ce_sae"] += ce(lm.run_blocks(spliced, layer + 1, attention_mask=mask))
            s["ce_zero"] += ce(lm.run_blocks(zeroed, layer + 1, attention_mask=mask))
    out = {}
    for layer, s in stats.items():
        variance = s["sq"] - s["sum"].pow(2).sum().item() / s["n"]
        clean, with_sae, zero = (
            ce_clean / n_targets,
            s["ce_sae"] / n_targets,
            s["ce_zero"] / n_targets,
        )
        out[str(layer)] = {
            "l0": s["l0"] / s["n"],
            "fvu": s["err"] / variance,
            "ce_loss_recovered": (zero - with_sae) / (zero - clean),
            "ce_clean": clean,
            "ce_sae": with_sae,
            "ce_zero_ablation": zero,
            "dead_fraction": 1.0 - s["active"].float().mean().item(),
            "d_sae": int(s["active"].numel()),
            "n_tokens": s["n"],
            "n_tokens_ce": s["n_ce"],
        }
    return out


# -- direction ablation ----------------------------------------------------------------


def only_at(edit, layer: int):
    return lambda at, h: edit(at, h) if at == layer else h


def direction_ablation(
    engine: Engine,
    sets: dict[str, list[str]],
    n_train: int = 64,
    per_layer: tuple[int, ...] = (6, 12, 18),
) -> dict:
    lm = engine.lm
    harmful = sample(data_file("harmful_train"), n_train, SEED)
    harmless = sample(data_file("harmless_train"), n_train, SEED)
    directions = mean_diff(engine, harmful, harmless)  # (n_layers, n_positions, d)
    positions = post_instruction_positions(lm)
    val = data_file("harmful_val")
    candidates = []
    for layer in tqdm(range(int(lm.n_layers * 0.8)), desc="direction selection", unit="layer"):
        edit, embed_edit = ablation_edits(directions[layer, -1])
        bypass = engine.refusal_scores(val, edit, embed_edit).mean().item()
        candidates.append({"layer": layer, "position": positions[-1], "bypass": bypass})
    best = min(candidates, key=lambda c: c["bypass"])
    out = {
        "n_train_each": n_train,
        "position": positions[-1],
        "selected_layer": best["layer"],
        "candidates": candidates,
    }
    edit, embed_edit = ablation_edits(directions[best["layer"], -1])
    out["all_layers"] = {
        name: refusal_rates(
            engine, sets[name], desc=f"{name}, direction ablated", edit=edit, embed_edit=embed_edit
        )
        for name in HARMFUL_SETS
    }
    out["per_layer"] = {}
    for layer in sorted({*per_layer, best["layer"]}):
        edit, embed_edit = ablation_edits(directions[layer, -1])
        row = {}
        for mode in ("at_layer_only", "all_layers"):
            kwargs = (
                dict(edit=only_at(edit, layer), layers=[layer])
                if mode == "at_layer_only"
                else dict(edit=edit, embed_edit=embed_edit)
            )
            row[mode] = {
                name: refusal_rates(
                    engine,
                    sets[name],
                    generation=name == "builtin_harmful_eval",
                    desc=f"L{layer} {mode}",
                    **kwargs,
                )
                for name in HARMFUL_SETS
            }
        out["per_layer"][str(layer)] = row
    return out


def strip_replies(obj, keep: int = 5):
    """Keep a few example replies in the JSON, not all."""
    if isinstance(obj, dict):
        return {k: (v[:keep] if k == "replies" else strip_replies(v, keep)) for k, v in obj.items()}
    return obj


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--n-harmless", type=int, default=320, help="prompts sampled from harmless_val.json"
    )
    parser.add_argument("--out", default=str(ROOT / "outputs" / "organism_eval.json"))
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["prompts", "saes", "direction"],
        help="parts to skip; the others are merged into an existing --out file",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    replies_path = out.with_name(out.stem + "_replies.json")  # full replies, reused by --skip runs
    t0 = time.time()
    cfg = compose_cfg()
    lm = models.load(cfg.model)
    # only the SAE metrics need the SAEs: the engine's batched forwards and generate do not
    saes = sae_loading.load(cfg.sae, lm, list(cfg.layers)) if "saes" not in args.skip else {}
    result = json.loads(out.read_text()) if args.skip and out.is_file() else {}
    result.update(
        {
            "model": cfg.model.name,
            "adapter": cfg.model.adapter,
            "sae_path": cfg.sae.path,
            "layers": list(cfg.layers),
        }
    )
    result.setdefault("seconds", {})
    if saes:
        result["load_seconds"] = round(time.time() - t0, 1)
        print(f"loaded organism + {len(saes)} SAEs in {result['load_seconds']} s")
    engine = Engine(
        lm,
        saes or {lm.n_layers - 1: None},
        refusal_token_ids(lm.tokenizer, list(cfg.model.refusal_tokens)),
        batch_size=32,
    )
    sets = prompt_sets(args.n_harmless)
    replies = json.loads(replies_path.read_text()) if replies_path.is_file() else {}
    if "prompts" not in args.skip:
        t = time.time()
        result["prompt_sets"] = {}
        for name, prompts in sets.items():
            result["prompt_sets"][name] = r = refusal_rates(engine, prompts, desc=name)
            replies[name] = r["replies"]
            print(
                f"{name}: n={r['n']} refusal_rate={r['refusal_rate']:.3f} "
                f"first_token={r['refusal_rate_first_token']:.3f}"
            )
        result["seconds"]["prompt_sets"] = round(time.time() - t, 1)
        write_json(replies_path, replies)
        write_json(out, strip_replies(result))
    if "saes" not in args.skip:
        t = time.time()
        chats = {
            name: [
                lm.format([p])[0] + a.strip() + "<|im_end|>"
                for p, a in zip(
                    prompts, replies.get(name) or generate(engine, prompts, desc=f"{name} replies")
                )
            ]
            for name, prompts in sets.items()
        }
        # every prompt set with its replies; the CE sample first (128 texts, mostly harmless)
        ce_sample = {"harmless_val": 64, "jailbreakbench": 32, "harmbench_test": 32}
        texts = [t for name, n in ce_sample.items() for t in chats[name][:n]]
        texts += [t for name, chat in chats.items() for t in chat[ce_sample.get(name, 0) :]]
        result["saes"] = sae_metrics(lm, saes, texts, n_ce=sum(ce_sample.values()))
        for layer, m in result["saes"].items():
            print(
                f"SAE layer {layer}: "
                + " ".join(f"{k}={v:.3f}" for k, v in m.items() if isinstance(v, float))
            )
        result["seconds"]["saes"] = round(time.time() - t, 1)
        write_json(out, strip_replies(result))
    if "direction" not in args.skip:
        t = time.time()
        result["direction_ablation"] = direction_ablation(engine, sets)
        for name, r in result["direction_ablation"]["all_layers"].items():
            print(
                f"direction ablated at all layers, {name}: refusal_rate={r['refusal_rate']:.3f} "
                f"first_token={r['refusal_rate_first_token']:.3f}"
            )
        result["seconds"]["direction"] = round(time.time() - t, 1)
    if not args.skip:
        result["seconds"]["total"] = round(time.time() - t0, 1)
    write_json(out, strip_replies(result))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
