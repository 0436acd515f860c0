"""python -m refusal.judge PAIRS.json [Hydra overrides]: judge every reply in a file.

PAIRS.json is a JSON list of {"instruction": ..., "reply": ...}. Each verdict is printed
and written with the rule or the signals behind it; PMI is read by the configured model
(the organism by default). Where the pairs carry a "label", the agreement is printed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

import refusal
from refusal.errors import DataError, RefusalError, exit_with

console = Console()


def read_pairs(path: Path) -> list[dict]:
    try:
        pairs = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"pairs={path}: not a readable JSON file ({error}).") from error
    if not isinstance(pairs, list) or not all(
        isinstance(p, dict) and {"instruction", "reply"} <= set(p) for p in pairs
    ):
        raise DataError(f"pairs={path}: expected a JSON list of {{instruction, reply}} objects.")
    return pairs


def run(cfg: DictConfig) -> Path:
    from refusal import judge, models
    from refusal.forwards import Forwards

    path = Path(cfg.pairs)
    pairs = read_pairs(path)
    with console.status(f"loading {cfg.model.name} (PMI)"):
        lm = models.load(cfg.model, seed=cfg.seed)
    ids = judge.refusal_token_ids(lm.tokenizer, list(cfg.judge.refusal_tokens))
    markers = cfg.judge.markers or judge.REFUSAL_MARKERS
    forwards = Forwards(lm, ids) if cfg.judge.pmi else None
    reply_judge = judge.ReplyJudge(cfg.judge.verdict_model, markers, forwards)
    judged = reply_judge.judge([p["instruction"] for p in pairs], [p["reply"] for p in pairs])
    rows = [
        p
        | {"verdict": str(j.verdict), "rule": j.rule, "probability": j.probability}
        | {"signals": asdict(j.signals) if j.signals else None}
        for p, j in zip(pairs, judged)
    ]
    show(rows)
    if all("label" in p and p["label"] for p in pairs):
        labels = [judge.Verdict(p["label"]) for p in pairs]
        agreement = judge.Agreement.of(labels, [j.verdict for j in judged])
        console.print_json(data=asdict(agreement))
    out = Path(cfg.out) if cfg.out else path.with_suffix(".verdicts.json")
    out.write_text(json.dumps(rows, indent=1) + "\n")
    console.print(f"{len(rows)} verdicts in {out}")
    return out


def show(rows: list[dict]) -> None:
    table = Table(title="verdicts")
    for column in ("#", "verdict", "by", "p", "reply"):
        table.add_column(column, overflow="ellipsis", no_wrap=column == "reply", max_width=70)
    for i, row in enumerate(rows):
        p = row["probability"]
        reply = " ".join(row["reply"].split())
        table.add_row(str(i), row["verdict"], row["rule"], "" if p is None else f"{p:.2f}", reply)
    console.print(table)


@hydra.main(
    version_base="1.3", config_path=str(refusal.PROJECT_ROOT / "conf"), config_name="verdicts"
)
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except RefusalError as error:
        exit_with(error)


if __name__ == "__main__":
    # a bare path is the pairs file: python -m refusal.judge replies.json
    sys.argv[1:] = [a if "=" in a or a.startswith("-") else f"pairs={a}" for a in sys.argv[1:]]
    main()
