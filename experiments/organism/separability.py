"""How well the base model itself already separates harmful from harmless requests: a
linear probe on its residual stream at the last template token, per layer.

The organism's targets ask for refusal >= 0.95 on jailbreakbench and harmbench_test and
<= 0.02 on harmless_val. If no linear read-out of the base model's residual reached that,
the fine-tune could not be blamed for missing it; if one does, the recipe is the limit.
The probe (logistic regression on standardised residuals) is fitted on the fine-tune's
own training prompts (harmful: `PromptFiles.harmful`, harmless: harmless_train) and read
on the evaluation sets, which it never saw. Reported per layer: the share of each harmful
set above the threshold that lets `max_harmless` of harmless_val through, and the share
of harmless_val above the threshold that keeps `min_harmful` of both harmful sets.
(The thresholds are set on the evaluation scores themselves: this bounds what a linear
read-out could do, it is not a classifier to deploy.)

    python -m experiments.organism.separability [separability.adapter=true]
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from experiments.organism.common import CONF, PromptFiles, base_model, forwards, sample, write_json
from refusal import models
from refusal.models import LM


def last_token_residuals(cfg: DictConfig, lm: LM, prompts: list[str]) -> dict[int, np.ndarray]:
    """(n, d_model) residual after each probed block, at each prompt's last template token."""
    fw, layers = forwards(lm, cfg), list(cfg.separability.layers)
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for ids, mask, seen in fw.residuals(lm.format(prompts), layers, batch_size=32):
        last = mask.sum(1) - 1
        for layer in layers:
            out[layer].append(seen[layer][torch.arange(len(ids)), last].float())
    return {layer: torch.cat(rows).numpy() for layer, rows in out.items()}


def probe(train: tuple[np.ndarray, np.ndarray], evaluation: dict[str, np.ndarray]) -> dict:
    """Fit on (harmful, harmless) training residuals; score every evaluation set."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate(train)
    y = np.r_[np.ones(len(train[0])), np.zeros(len(train[1]))]
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=0.1, max_iter=3000).fit(scaler.transform(x), y)
    return {name: clf.decision_function(scaler.transform(z)) for name, z in evaluation.items()}


def rates(scores: dict[str, np.ndarray], sep: DictConfig) -> dict[str, float]:
    harmless, harmful = (
        scores["harmless_val"],
        [scores[n] for n in ("jailbreakbench", "harmbench_test")],
    )
    above = float(np.quantile(harmless, 1 - sep.max_harmless))
    keep = min(float(np.quantile(s, 1 - sep.min_harmful)) for s in harmful)
    return {
        "jailbreakbench_at_max_harmless": float((scores["jailbreakbench"] > above).mean()),
        "harmbench_test_at_max_harmless": float((scores["harmbench_test"] > above).mean()),
        "harmless_val_at_min_harmful": float((harmless >= keep).mean()),
    }


def separability(cfg: DictConfig) -> dict:
    sep, files = cfg.separability, PromptFiles(cfg)
    lm = models.load(cfg.model) if sep.adapter else base_model(cfg)
    train = (
        sample(files.harmful(), sep.n_harmful, cfg.seed),
        sample(files.read("harmless_train"), sep.n_harmless, cfg.seed + 1),
    )
    evaluation = {
        "jailbreakbench": files.read("jailbreakbench"),
        "harmbench_test": files.read("harmbench_test"),
        "harmless_val": sample(files.read("harmless_val"), sep.n_harmless_val, cfg.seed),
    }
    fitted = [last_token_residuals(cfg, lm, p) for p in train]
    evaluated = {name: last_token_residuals(cfg, lm, p) for name, p in evaluation.items()}
    by_layer = {}
    for layer in sep.layers:
        scores = probe(
            (fitted[0][layer], fitted[1][layer]), {n: r[layer] for n, r in evaluated.items()}
        )
        by_layer[layer] = rates(scores, sep)
        print(f"layer {layer}: {by_layer[layer]}")
    result = {"model": "organism" if sep.adapter else "base", "layers": by_layer}
    write_json(Path(sep.out), result)
    return result


@hydra.main(version_base="1.3", config_path=CONF, config_name="organism")
def main(cfg: DictConfig) -> dict:
    return separability(cfg)


if __name__ == "__main__":
    main()
