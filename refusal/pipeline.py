"""The stages of a run, in order: baseline → direction → greedy → interactions → dormant.

Each stage reads what the previous ones left in the run directory and appends its own
results there as it goes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from refusal import data, judge, models, saes
from refusal.engine import Ablation, Engine
from refusal.tracking import RunDir

console = Console(stderr=True)


@dataclass
class Run:
    """Everything a stage needs: the config, model, SAEs, prompts, engine and run dir."""

    cfg: DictConfig
    lm: models.LM
    engine: Engine
    prompts: data.Prompts
    out: RunDir

    def refuses(self, score: float, reply: str) -> bool:
        return score > self.cfg.judge.threshold and judge.is_refusal(reply)


def setup(cfg: DictConfig) -> Run:
    torch.manual_seed(cfg.seed)
    prompts = data.load(cfg.data)  # cheap checks first: bad prompt files fail before loading a model
    with console.status(f"loading {cfg.model.name} and {len(cfg.layers)} SAE(s)"):
        lm = models.load(cfg.model, seed=cfg.seed)
        sae_by_layer = saes.load(cfg.sae, lm, list(cfg.layers), seed=cfg.seed)
    engine = Engine(
        lm, sae_by_layer, judge.refusal_token_ids(lm.tokenizer, list(cfg.judge.refusal_tokens)),
        Ablation(**cfg.search.ablation), batch_size=cfg.search.batch_size,
    )
    return Run(cfg, lm, engine, prompts, RunDir(cfg.paths.output_dir))


def baseline(run: Run) -> list[dict]:
    """Judge every evaluation prompt; only prompts the model refuses go on."""
    rows = []
    for i, instruction in enumerate(tqdm(run.prompts.eval, desc="baseline", unit="prompt")):
        score = run.engine.prepare(instruction).score
        reply = run.engine.generate([instruction], max_new_tokens=run.cfg.judge.max_new_tokens)[0]
        row = {"stage": "baseline", "prompt_id": i, "instruction": instruction, "score": score,
               "reply": reply, "refused": run.refuses(score, reply)}
        run.out.append("results.jsonl", row)
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    table = Table(title="baseline")
    for column in ("id", "refused", "score", "instruction", "reply"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(str(r["prompt_id"]), "yes" if r["refused"] else "no", f"{r['score']:.2f}",
                      r["instruction"][:60], r["reply"][:60].replace("\n", " "))
    Console().print(table)


def run(cfg: DictConfig) -> float | None:
    """Run the configured stages; return the optimised summary metric."""
    start = time.time()
    state = setup(cfg)
    rows = baseline(state)
    n_refused = sum(r["refused"] for r in rows)
    summary = {"n_eval": len(rows), "n_refused": n_refused, "wall_seconds": time.time() - start,
               "stages_run": ["baseline"]}
    state.out.write_json("summary.json", summary)
    print_table(rows)
    console.print(
        f"baseline: the model refused {n_refused} of {len(rows)} evaluation prompts. "
        f"Results in {state.out.path}"
    )
    return None
