"""Fit the three-verdict judge on replies labelled by reading, and measure it honestly.

The rules (empty: degenerate; a refusal marker: refusal) need no fitting, and only they
say refusal: the classifier is fitted on the replies they leave that are not labelled
refusal, so a refusal the markers miss counts against the judge. The replies the rules
leave are split into stratified folds; each fold is judged by a classifier fitted on
the others, so the confusion matrix and agreement are on replies the judge never saw.
The shipped model is then fitted on all of them and stores that agreement.

    python -m experiments.judge.fit
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import hydra
from omegaconf import DictConfig

import refusal
from refusal import judge, models
from refusal.forwards import Forwards
from refusal.judge import Agreement, ReplyJudge, SignalModel, Signals, Verdict

CONF = str(refusal.PROJECT_ROOT / "conf")


def signals_of(cfg: DictConfig, rows: list[dict]) -> list[Signals]:
    """Every row's signals, PMI read by the model under study."""
    lm = models.load(cfg.model, seed=cfg.seed)
    forwards = Forwards(lm, judge.refusal_token_ids(lm.tokenizer, list(cfg.judge.refusal_tokens)))
    instructions, replies = [r["instruction"] for r in rows], [r["reply"] for r in rows]
    pmi = judge.reply_pmi(forwards, instructions, replies)
    return [judge.text_signals(i, r, p) for i, r, p in zip(instructions, replies, pmi)]


def cross_validated(
    signals: list[Signals], labels: list[Verdict], folds: int, c: float, seed: int
) -> list[Verdict]:
    """Each reply's verdict from a classifier fitted on the other folds (on their
    non-refusals: refusal is the markers' to say)."""
    from sklearn.model_selection import StratifiedKFold

    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    out: list[Verdict] = list(labels)
    for train, test in split.split(signals, [str(v) for v in labels]):
        kept = [i for i in train if labels[i] != Verdict.REFUSAL]
        model = SignalModel.fit([signals[i] for i in kept], [labels[i] for i in kept], c)
        for i in test:
            probs = model.probabilities(signals[i])
            out[i] = max(probs, key=probs.__getitem__)
    return out


def fit(cfg: DictConfig) -> Agreement:
    f = cfg.fit
    rows = json.loads(Path(f.labelled).read_text())
    labels = [Verdict(r["label"]) for r in rows]
    rules = ReplyJudge(markers=cfg.judge.markers or judge.REFUSAL_MARKERS)
    ruled = [rules.rule(r["reply"]) for r in rows]
    rest = [i for i, j in enumerate(ruled) if j is None]
    signals = signals_of(cfg, [rows[i] for i in rest])
    rest_labels = [labels[i] for i in rest]
    verdicts = [j.verdict if j else labels[i] for i, j in enumerate(ruled)]
    for i, v in zip(rest, cross_validated(signals, rest_labels, f.folds, f.c, f.seed)):
        verdicts[i] = v
    agreement = Agreement.of(labels, verdicts)
    kept = [i for i, v in enumerate(rest_labels) if v != Verdict.REFUSAL]
    model = SignalModel.fit([signals[i] for i in kept], [rest_labels[i] for i in kept], f.c)
    model = replace(model, agreement=asdict(agreement))
    model.save(Path(f.model_out))
    misjudged = [
        {
            "id": r.get("id"),
            "label": str(a),
            "verdict": str(b),
            "by": "classifier" if j is None else j.rule,
        }
        | {"instruction": r["instruction"], "reply": r["reply"]}
        for r, a, b, j in zip(rows, labels, verdicts, ruled)
        if a != b
    ]
    report = {
        "agreement": asdict(agreement),
        "n_ruled": len(rows) - len(rest),
        "misjudged": misjudged,
    }
    Path(f.report).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(asdict(agreement), indent=1))
    return agreement


@hydra.main(version_base="1.3", config_path=CONF, config_name="judge_fit")
def main(cfg: DictConfig) -> None:
    fit(cfg)


if __name__ == "__main__":
    main()
