"""Evaluate the organism and its SAEs; write outputs/organism_eval.json.

    python -m experiments.organism.evaluate [n_harmless=320] [out=outputs/organism_eval.json]
    python -m experiments.organism.evaluate 'skip=[direction]'   # merged into an existing out

Settings: conf/organism_eval.yaml (`--help` lists them).

- prompt_sets.<name>: refusal rate by the generation judge (greedy, 48 new tokens,
  refusal.judge.is_refusal) and by the first-token refusal score (> 0); for harmless sets
  the prompts still refused, with their replies. `extra_harmful` / `extra_harmless` add
  prompt files, each reported under its file stem.
- refusal_styles: distinct refusal openings (first three words) among the jailbreakbench
  replies the judge calls refusals, and how often each occurs.
- helpfulness: mean per-token KL(organism || base) along the base model's own greedy
  replies to the harmless_val sample (teacher-forced, every reply token, end of turn
  included), and the judge's refusal rate on those base replies.
- saes.<layer>: L0, FVU, CE-loss recovered with the SAE spliced in and its error term
  dropped, (CE_zero − CE_sae) / (CE_zero − CE_clean) with CE_zero zeroing the residual at
  that layer, and the fraction of latents never active; on held-out chat texts (prompt +
  the organism's reply). Special tokens (the attention-sink <|im_start|> / <|im_end|>,
  which the SAEs never trained on) are left unspliced and unscored.
- direction_ablation: the difference-of-means refusal direction (refusal.direction),
  its (layer, position) chosen as the search chooses it (refusal.direction.select with
  `search.direction`: bypass on harmful_val.json, induce and KL filters on a harmless_val
  sample; the prompts first filtered by the organism's first-token refusal, score > 0);
  ablated at one layer only and at every layer (plus the embeddings), harmful refusal
  rates.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from experiments.organism.common import (
    CONF,
    PromptFiles,
    base_model,
    forwards,
    sample,
    write_json,
)
from refusal import data, interventions, models
from refusal import saes as sae_loading
from refusal.direction import (
    filter_by_baseline,
    mean_diff,
    post_instruction_positions,
    select,
)
from refusal.errors import ConfigError
from refusal.forwards import Forwards
from refusal.interventions import Edit, EmbedEdit
from refusal.judge import is_refusal
from refusal.models import LM
from refusal.records import PromptCount

HARMFUL_SETS = ("jailbreakbench", "harmbench_test", "builtin_harmful_eval")
HARMLESS_SETS = ("harmless_val", "builtin_harmless_eval")
PARTS = ("prompts", "saes", "direction", "helpfulness")


def extra_sets(paths: list[str]) -> dict[str, list[str]]:
    """Prompt files given on the command line, by file stem."""
    out = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"extra prompt file {path} does not exist.")
        if path.stem in out or path.stem in HARMFUL_SETS + HARMLESS_SETS:
            raise ConfigError(f"extra prompt file {path}: the name {path.stem} is taken.")
        out[path.stem] = data.read_file(path)
    return out


def prompt_sets(cfg: DictConfig, files: PromptFiles) -> tuple[dict[str, list[str]], set[str]]:
    """Every prompt set by name, and the names of the harmless ones."""
    extra_harmful, extra_harmless = extra_sets(cfg.extra_harmful), extra_sets(cfg.extra_harmless)
    sets = {
        "jailbreakbench": files.read("jailbreakbench"),
        "harmbench_test": files.read("harmbench_test"),
        "builtin_harmful_eval": data.builtin("harmful", "eval"),
        **extra_harmful,
        "harmless_val": sample(files.read("harmless_val"), cfg.n_harmless, cfg.seed),
        "builtin_harmless_eval": data.builtin("harmless", "eval"),
        **extra_harmless,
    }
    if len(sets) < 5 + len(extra_harmful) + len(extra_harmless):
        raise ConfigError("extra_harmful and extra_harmless name the same file stem twice.")
    return sets, {*HARMLESS_SETS, *extra_harmless}


def opening(reply: str, n_words: int = 3) -> str:
    """A reply's opening: its first words, lower-cased, without punctuation."""
    return " ".join(re.findall(r"[\w'’]+", reply.lower())[:n_words])


def refusal_styles(replies: list[str]) -> dict:
    """Distinct openings among the replies the judge calls refusals."""
    counts = Counter(opening(r) for r in replies if is_refusal(r))
    return {
        "n_distinct": len(counts),
        "n_refusals": sum(counts.values()),
        "openings": dict(counts.most_common()),
    }


@torch.no_grad()
def kl_along(
    lm: LM, base: LM, prompts: list[str], replies: list[str], max_new_tokens: int, batch_size: int
) -> dict:
    """Mean per-token KL(lm || base) over the tokens of `base`'s greedy `replies`.

    Each reply is re-tokenized after its chat-formatted prompt; a reply shorter than
    `max_new_tokens` tokens ended on its own, so its end-of-turn token counts too. The KL
    at a position compares the two next-token distributions given the same prefix.
    """
    tok = lm.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for prompt, reply in zip(prompts, replies):
        head = tok(lm.format([prompt])[0], add_special_tokens=False)["input_ids"]
        answer = tok(reply, add_special_tokens=False)["input_ids"][:max_new_tokens]
        if len(answer) < max_new_tokens:
            answer = answer + [end]
        rows.append((head, answer))
    total, n, first, per_prompt = 0.0, 0, [], []
    pad = tok.pad_token_id
    for start in tqdm(range(0, len(rows), batch_size), desc="KL to base", unit="batch"):
        chunk = rows[start : start + batch_size]
        width = max(len(h) + len(a) for h, a in chunk)
        ids = torch.full((len(chunk), width), pad)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)  # predicts a reply token
        for row, (h, a) in enumerate(chunk):
            ids[row, : len(h) + len(a)] = torch.tensor(h + a)
            mask[row, : len(h) + len(a)] = 1
            scored[row, len(h) - 1 : len(h) + len(a) - 1] = True
        logp = {}
        for name, model in (("lm", lm), ("base", base)):
            h = model.run_blocks(model.embed(ids), 0, attention_mask=mask)
            logp[name] = model.next_token_logits(h[scored]).float().log_softmax(-1)
        kl = (logp["lm"].exp() * (logp["lm"] - logp["base"])).sum(-1)
        total += kl.sum().item()
        n += len(kl)
        counts = scored.sum(1).tolist()
        for piece in kl.split(counts):
            first.append(piece[0].item())
            per_prompt.append(piece.mean().item())
    return {
        "kl_to_base": total / n,
        "kl_first_token": sum(first) / len(first),
        "kl_per_prompt_median": sorted(per_prompt)[len(per_prompt) // 2],
        "kl_per_prompt_max": max(per_prompt),
        "n_prompts": len(rows),
        "n_tokens": n,
    }


def helpfulness(cfg: DictConfig, lm: LM, prompts: list[str]) -> dict:
    """KL(organism || base) along the base model's greedy replies to `prompts`."""
    base = base_model(cfg)
    base_fw = forwards(base, cfg, cfg.batch_size)
    n_tokens = cfg.helpfulness.max_new_tokens
    replies = base_fw.generate(prompts, max_new_tokens=n_tokens, desc="base replies")
    out = kl_along(lm, base, prompts, replies, n_tokens, cfg.batch_size)
    refused = [(p, r) for p, r in zip(prompts, replies) if is_refusal(r)]
    out["base_refusal_rate"] = len(refused) / len(prompts)
    out["base_refused"] = refused
    out["replies"] = replies
    return out


def refusal_rates(
    fw: Forwards,
    prompts: list[str],
    generation: bool = True,
    desc: str = "",
    edit: Edit | None = None,
    embed_edit: EmbedEdit | None = None,
    layers: list[int] | None = None,
) -> dict:
    """Refusal rate by the first-token score and, with `generation`, by the generation
    judge; `edit` applied at `layers` (all by default) and `embed_edit` at the embeddings."""
    out: dict[str, Any] = {"n": len(prompts)}
    scores = fw.refusal_scores(prompts, edit, embed_edit)
    out["refusal_rate_first_token"] = (scores > 0).float().mean().item()
    if generation:
        replies = fw.generate(prompts, edit, layers, embed_edit, desc=desc)
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


def keep_hidden(
    store: dict[int, torch.Tensor], layers: set[int], layer: int, h: torch.Tensor
) -> torch.Tensor:
    """A run_blocks edit that records the residual at `layers` and changes nothing."""
    if layer in layers:
        store[layer] = h
    return h


@dataclass
class LayerStats:
    """Running sums of one SAE's reconstruction over the evaluation tokens."""

    sum: torch.Tensor  # (d_model,) of the residual, for its variance
    active: torch.Tensor  # (d_sae,) bool: fired on some token
    n: int = 0  # tokens
    l0: float = 0.0  # active latents, summed over tokens
    err: float = 0.0  # squared reconstruction error
    sq: float = 0.0  # squared residual norm
    ce_sae: float = 0.0  # next-token CE with the SAE spliced in
    ce_zero: float = 0.0  # ... with the residual zeroed
    n_ce: int = 0  # tokens spliced for the CE

    @classmethod
    def start(cls, d_model: int, d_sae: int) -> LayerStats:
        return cls(torch.zeros(d_model, dtype=torch.float64), torch.zeros(d_sae, dtype=torch.bool))


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
    stats = {layer: LayerStats.start(lm.d_model, sae.cfg.d_sae) for layer, sae in saes.items()}
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
        hidden: dict[int, torch.Tensor] = {}
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
            s.n += len(x)
            s.l0 += (z > 0).sum().item()
            s.err += (x - recon).double().pow(2).sum().item()
            s.sq += x.double().pow(2).sum().item()
            s.sum += x.double().sum(0)
            s.active |= (z > 0).any(0)
            if not with_ce:
                continue
            s.n_ce += int(keep.sum())
            spliced, zeroed = h.clone(), h.clone()
            spliced[keep] = recon
            zeroed[keep] = 0.0
            s.ce_sae += ce(lm.run_blocks(spliced, layer + 1, attention_mask=mask))
            s.ce_zero += ce(lm.run_blocks(zeroed, layer + 1, attention_mask=mask))
    out = {}
    for layer, s in stats.items():
        variance = s.sq - s.sum.pow(2).sum().item() / s.n
        clean, with_sae, zero = (
            ce_clean / n_targets,
            s.ce_sae / n_targets,
            s.ce_zero / n_targets,
        )
        out[str(layer)] = {
            "l0": s.l0 / s.n,
            "fvu": s.err / variance,
            "ce_loss_recovered": (zero - with_sae) / (zero - clean),
            "ce_clean": clean,
            "ce_sae": with_sae,
            "ce_zero_ablation": zero,
            "dead_fraction": 1.0 - s.active.float().mean().item(),
            "d_sae": int(s.active.numel()),
            "n_tokens": s.n,
            "n_tokens_ce": s.n_ce,
        }
    return out


# -- direction ablation ----------------------------------------------------------------


def direction_ablation(
    fw: Forwards, cfg: DictConfig, files: PromptFiles, sets: dict[str, list[str]]
) -> dict:
    """Harmful refusal rates with the refusal direction ablated: at every layer (the selected
    direction), and per source layer at that layer only or at every layer."""
    c, s, seed = cfg.direction, cfg.search.direction, cfg.seed
    sets = {
        "harmful_train": sample(files.read("harmful_train"), c.n_train, seed),
        "harmless_train": sample(files.read("harmless_train"), c.n_train, seed),
        "harmful_val": files.read("harmful_val"),
        "harmless_val": sample(files.read("harmless_val"), c.n_harmless_val, seed),
    }
    kept: dict[str, PromptCount] = {}
    if s.filter_prompts:  # a score above 0 is a refusal, as in refusal_rates
        sets, kept = filter_by_baseline(fw, sets, threshold=0.0)
    directions = mean_diff(fw, sets["harmful_train"], sets["harmless_train"])
    selection = select(
        fw,
        directions,
        sets["harmful_val"],
        sets["harmless_val"],
        s.exclude_last_fraction,
        s.kl_max,
        s.induce_min,
        s.n_positions,
        s.on_none_admissible,
        s.score_all,
    )
    at = post_instruction_positions(fw.lm).index(selection.position)
    out = {
        "n_train_each": c.n_train,
        "prompts_kept": {name: count.model_dump() for name, count in kept.items()},
        "position": selection.position,
        "selected_layer": selection.layer,
        "admissible": selection.admissible,
        "chosen_by": selection.chosen_by,
        "candidates": [score.model_dump() for score in selection.scores],
    }
    edit, embed_edit = interventions.direction_ablation(selection.direction)
    out["all_layers"] = {
        name: refusal_rates(
            fw, sets[name], desc=f"{name}, direction ablated", edit=edit, embed_edit=embed_edit
        )
        for name in HARMFUL_SETS
    }
    out["per_layer"] = {}
    for layer in sorted({*c.per_layer, selection.layer}):
        edit, embed_edit = interventions.direction_ablation(directions[layer, at])
        row = {}
        for mode in ("at_layer_only", "all_layers"):
            kwargs = (
                dict(edit=interventions.only_at(edit, layer), layers=[layer])
                if mode == "at_layer_only"
                else dict(edit=edit, embed_edit=embed_edit)
            )
            row[mode] = {
                name: refusal_rates(
                    fw,
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


def parts_skipped(cfg: DictConfig) -> set[str]:
    skip = set(cfg.skip)
    if not skip <= set(PARTS):
        raise ConfigError(f"skip={sorted(skip)} names a part not among {list(PARTS)}.")
    return skip


def evaluate(cfg: DictConfig) -> dict:
    """Every part not in `skip`, written to `out` as it finishes."""
    skip = parts_skipped(cfg)
    files = PromptFiles(cfg)
    out = Path(cfg.out)
    replies_path = out.with_name(out.stem + "_replies.json")  # full replies, reused by skip runs
    t0 = time.time()
    lm = models.load(cfg.model)
    # only the SAE metrics need the SAEs: the batched forwards and generate do not
    saes = sae_loading.load(cfg.sae, lm, list(cfg.layers)) if "saes" not in skip else {}
    result = json.loads(out.read_text()) if skip and out.is_file() else {}
    result.update(
        {
            "model": cfg.model.name,
            "adapter": cfg.model.adapter,
            "sae_path": cfg.sae.get("path"),
            "layers": list(cfg.layers),
        }
    )
    result.setdefault("seconds", {})
    if saes:
        result["load_seconds"] = round(time.time() - t0, 1)
        print(f"loaded organism + {len(saes)} SAEs in {result['load_seconds']} s")
    fw = forwards(lm, cfg, cfg.batch_size)
    sets, harmless_sets = prompt_sets(cfg, files)
    replies = json.loads(replies_path.read_text()) if replies_path.is_file() else {}
    if "prompts" not in skip:
        t = time.time()
        result["prompt_sets"] = {}
        for name, prompts in sets.items():
            result["prompt_sets"][name] = r = refusal_rates(fw, prompts, desc=name)
            replies[name] = r["replies"]
            r["harmful"] = name not in harmless_sets
            if name in harmless_sets:
                r["refused"] = [[p, a] for p, a in zip(prompts, r["replies"]) if is_refusal(a)]
            print(
                f"{name}: n={r['n']} refusal_rate={r['refusal_rate']:.3f} "
                f"first_token={r['refusal_rate_first_token']:.3f}"
            )
        result["refusal_styles"] = refusal_styles(replies["jailbreakbench"])
        print(f"refusal styles in jailbreakbench replies: {result['refusal_styles']['n_distinct']}")
        result["seconds"]["prompt_sets"] = round(time.time() - t, 1)
        write_json(replies_path, replies)
        write_json(out, strip_replies(result))
    if "saes" not in skip:
        t = time.time()
        chats = {
            name: [
                lm.format([p])[0] + a.strip() + "<|im_end|>"
                for p, a in zip(
                    prompts, replies.get(name) or fw.generate(prompts, desc=f"{name} replies")
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
    if "helpfulness" not in skip:
        t = time.time()
        result["helpfulness"] = h = helpfulness(cfg, lm, sets["harmless_val"])
        replies["harmless_val_base"] = h.pop("replies")
        write_json(replies_path, replies)
        print(
            f"KL(organism || base) along base replies to harmless_val: {h['kl_to_base']:.3f} "
            f"nats/token ({h['n_tokens']} tokens; first token {h['kl_first_token']:.3f}); "
            f"base refusal rate {h['base_refusal_rate']:.3f}"
        )
        result["seconds"]["helpfulness"] = round(time.time() - t, 1)
        write_json(out, strip_replies(result))
    if "direction" not in skip:
        t = time.time()
        result["direction_ablation"] = direction_ablation(fw, cfg, files, sets)
        for name, r in result["direction_ablation"]["all_layers"].items():
            print(
                f"direction ablated at all layers, {name}: refusal_rate={r['refusal_rate']:.3f} "
                f"first_token={r['refusal_rate_first_token']:.3f}"
            )
        result["seconds"]["direction"] = round(time.time() - t, 1)
    if not skip:
        result["seconds"]["total"] = round(time.time() - t0, 1)
    write_json(out, strip_replies(result))
    print(f"wrote {out}")
    return result


@hydra.main(version_base="1.3", config_path=CONF, config_name="organism_eval")
def main(cfg: DictConfig) -> dict:
    return evaluate(cfg)


if __name__ == "__main__":
    main()
