"""Replies of the model under study to label by reading (the judge's labelled set).

For each of the run's first n_harmful eval prompts: the clean reply, the reply with the
difference-of-means refusal direction ablated at every layer and at the layers up to its
own, and with the top-k candidate latents per SAE layer ablated (as greedy filtering
starts); for n_harmless harmless val prompts, the clean reply. Every reply is generated
as verification generates (greedy, judge.max_new_tokens tokens).

    python -m experiments.judge.collect                 # the organism
    python -m experiments.judge.collect collect.n_harmful=80
    python -m experiments.judge.collect 'collect.conditions=[]' collect.n_harmless=0  # latents only
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

import refusal
from refusal import direction, pipeline
from refusal.context import Context
from refusal.interventions import direction_ablation

CONF = str(refusal.PROJECT_ROOT / "conf")


def direction_replies(
    ctx: Context, prompts: list[str], r: torch.Tensor, layer: int
) -> dict[str, list[str]]:
    """The refusal direction r (read at `layer`) ablated at every layer, and at the
    embeddings and the layers up to `layer` only."""
    edit, embed_edit = direction_ablation(r)
    generate = ctx.forwards.generate
    tokens = ctx.cfg.judge.max_new_tokens
    return {
        "direction_all_layers": generate(
            prompts, edit, embed_edit=embed_edit, max_new_tokens=tokens, desc="direction"
        ),
        "direction_early_layers": generate(
            prompts,
            edit,
            layers=range(layer + 1),
            embed_edit=embed_edit,
            max_new_tokens=tokens,
            desc="direction, early layers",
        ),
    }


def feature_replies(ctx: Context, prompts: list[str], r: torch.Tensor, top_k: int) -> list[str]:
    """Each prompt's top_k latents per SAE layer by decoder cosine to the direction r (active
    on it) ablated: the set greedy filtering starts from."""
    targets = dict.fromkeys(ctx.engine.saes, r)
    replies = []
    for prompt in tqdm(prompts, desc=f"top {top_k} latents ablated", unit="prompt"):
        latents = ctx.engine.latents(ctx.engine.prepare(prompt))
        found = direction.candidates(ctx.engine.saes, targets, latents, top_k, cos_floor=-1.0)
        replies.append(ctx.reply(prompt, [f for f, _ in found]))
    return replies


def collect(cfg: DictConfig) -> Path:
    ctx = pipeline.setup(cfg)
    c = cfg.collect
    layer = c.direction_layer if c.direction_layer is not None else ctx.lm.n_layers // 2
    harmful, harmless = ctx.prompts.eval[: c.n_harmful], ctx.prompts.harmless_val[: c.n_harmless]
    tokens = cfg.judge.max_new_tokens
    diffs = direction.mean_diff(ctx.forwards, ctx.prompts.harmful_train, ctx.prompts.harmless_train)
    r = diffs[layer, -1]  # the last post-instruction position
    sets = {}
    if "clean" in c.conditions:
        sets["clean"] = ctx.forwards.generate(harmful, max_new_tokens=tokens, desc="clean")
    if "direction" in c.conditions:
        sets |= direction_replies(ctx, harmful, r, layer)
    for k in c.top_k:
        sets[f"top{k}_latents"] = feature_replies(ctx, harmful, r, k)
    rows = [
        {"source": source, "instruction": p, "reply": reply, "label": None}
        for source, replies in sets.items()
        for p, reply in zip(harmful, replies)
    ]
    clean = ctx.forwards.generate(harmless, max_new_tokens=tokens, desc="harmless")
    rows += [
        {"source": "harmless_clean", "instruction": p, "reply": reply, "label": None}
        for p, reply in zip(harmless, clean)
    ]
    out = Path(c.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([{"id": i} | row for i, row in enumerate(rows)], indent=1))
    print(f"{len(rows)} replies to label in {out}")
    return out


@hydra.main(version_base="1.3", config_path=CONF, config_name="judge_collect")
def main(cfg: DictConfig) -> None:
    collect(cfg)


if __name__ == "__main__":
    main()
