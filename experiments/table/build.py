"""The headline table: per prompt set, how often each edit jailbreaks and what it costs.

    python -m experiments.table.build            # make table
    python -m experiments.table.build table.sets.advbench_heldout.n=16   # fewer prompts

For each set of conf/table.yaml a full search run (every stage of `search.stages`,
controls included) on its first n prompts, in <run dir>/<set>/; the refusal direction is
selected once, by the first set's run, and reused by the others (it depends on the
model and the train/val prompts only). Rows: the sets; columns: the baseline refusal
rate, the jailbreak rate of each prompt's own M, of a shared set (fitted on one half of
the prompts greedy found an M for, judged on the other), of the refusal direction
ablated, of random sets shaped like each M (every prompt with an M, jailbroken or not),
each edit's harmless KL, ΔCE and harmless refusal rate, and
the refusal the shared set induces on harmless prompts. Rates come with counts and
Wilson 95 % intervals (the random control: a bootstrap over prompts).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import hydra
import pandas as pd
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf, open_dict

import refusal
from refusal import data, pipeline
from refusal.document import markdown_table
from refusal.records import ControlsRecord, EditCost, PromptResult, Summary, join, parse_row
from refusal.rundir import RunDir
from refusal.stages.direction import SAVED as DIRECTION

CONF = str(refusal.PROJECT_ROOT / "conf")
EDITS = ("minimal", "shared", "direction", "random")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson score interval of k successes in n trials (None for n = 0)."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(values: list[float], n: int, seed: int) -> tuple[float, float] | None:
    """Percentile 95 % interval of the mean over resampled values."""
    if not values:
        return None
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def held_out(cfg: DictConfig, name: str, source: str, out: Path) -> Path:
    """The set less every harmful prompt the organism was built on (exact match against
    the build's own list), written to out/<name>.json."""
    from experiments.organism.common import PromptFiles

    built_on = set(PromptFiles(cfg).harmful())
    kept = [{"instruction": p} for p in data.read_file(Path(source)) if p not in built_on]
    path = out / f"{name}.json"
    path.write_text(json.dumps(kept, indent=1))
    print(f"{name}: {len(kept)} prompts the organism was not built on")
    return path


def run_set(cfg: DictConfig, name: str, path: str, n: int, out: Path, direction: Path | None):
    """One full search run on a prompt set, in out/name; the run's summary, controls and
    results."""
    run_dir = out / name
    job = OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "table"])
    with open_dict(job):
        job.data.eval, job.data.max_eval = path, n
        job.paths.output_dir = str(run_dir)
        job.search.direction.load = None if direction is None else str(direction)
        if "wandb" in (job.get("logger") or {}):
            job.logger.wandb.name = f"table {name}"
    pipeline.run(job)
    summary = Summary.model_validate_json((run_dir / "summary.json").read_text())
    controls_file = run_dir / "controls.json"
    controls = (
        ControlsRecord.model_validate_json(controls_file.read_text())
        if controls_file.exists()
        else None
    )
    results = join([parse_row(r) for r in RunDir(run_dir).read("results.jsonl")])
    return summary, controls, results


def rate(k: int, n: int) -> dict:
    interval = wilson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else None, "ci": interval}


def cost_cells(prefix: str, cost: EditCost | None) -> dict:
    if cost is None:
        return {}
    return {
        f"{prefix}_kl": cost.harmless_kl,
        f"{prefix}_dce": cost.delta_ce,
        f"{prefix}_harmless_refusal": cost.harmless_refusal_rate,
    }


def row(
    name: str,
    summary: Summary,
    controls: ControlsRecord | None,
    results: list[PromptResult],
    resamples: int,
    seed: int,
) -> dict:
    """One set's cells: each rate with its count and interval, each edit's costs."""
    out: dict = {"set": name, "n_prompts": summary.n_eval}
    out["baseline_refusal"] = rate(summary.n_refused, summary.n_eval)
    out["minimal"] = rate(summary.n_jailbroken, summary.n_refused)
    randoms = [r.random_control.jailbreak_rate for r in results if r.random_control]
    present = [v for v in randoms if v is not None]
    out["random"] = {
        "rate": sum(present) / len(present) if present else None,
        "n": len(present),
        "ci": bootstrap(present, resamples, seed),
    }
    if controls is not None:
        out["clean_harmless_refusal"] = controls.clean_harmless_refusal_rate
        out |= cost_cells("minimal", controls.minimal_cost)
        out |= cost_cells("random", controls.random_cost)
        if controls.shared is not None:
            s = controls.shared
            out["shared"] = rate(s.n_jailbroken_held_out, len(s.held_out))
            out["shared_size"] = len(s.features)
            out |= cost_cells("shared", s.cost)
            k = round(s.induced_refusal_rate * s.cost.n_prompts)
            out["induced_refusal"] = rate(k, s.cost.n_prompts)
        if controls.direction is not None:
            d = controls.direction
            out["direction"] = rate(d.n_jailbroken, d.n_prompts)
            out |= cost_cells("direction", d.cost)
    return out


def cell(value) -> str:
    """A rate as "0.25 (4/16) [0.10, 0.49]"; numbers to 3 digits; missing blank."""
    if isinstance(value, dict):
        if value.get("rate") is None:
            return "—"
        counts = f" ({value['k']}/{value['n']})" if "k" in value else f" (n={value['n']})"
        ci = value.get("ci")
        return f"{value['rate']:.2f}{counts}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def figure(rows: list[dict]) -> Figure:
    """Jailbreak rate per edit and set, with the 95 % intervals."""
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(EDITS)
    for k, edit in enumerate(EDITS):
        xs, ys, lo, hi = [], [], [], []
        for i, r in enumerate(rows):
            cellv = r.get(edit) or {}
            if cellv.get("rate") is None:
                continue
            xs.append(i + (k - (len(EDITS) - 1) / 2) * width)
            ys.append(cellv["rate"])
            ci = cellv.get("ci") or (cellv["rate"], cellv["rate"])
            lo.append(cellv["rate"] - ci[0])
            hi.append(ci[1] - cellv["rate"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=edit)
    ax.set_xticks(range(len(rows)), [r["set"] for r in rows])
    ax.set_ylabel("jailbreak rate (judge: compliance)")
    ax.set_ylim(0, 1)
    ax.legend(title="edit")
    return fig


def write(rows: list[dict], out: Path) -> Path:
    table = pd.DataFrame([{k: cell(v) for k, v in r.items()} for r in rows])
    table.to_csv(out / "table.csv", index=False)
    (out / "table.json").write_text(json.dumps(rows, indent=1))
    figure(rows).savefig(out / "table.png", dpi=120)
    path = out / "table.md"
    path.write_text(markdown_table(table) + "\n\n![jailbreak rates](table.png)\n")
    return path


def build(cfg: DictConfig) -> Path:
    out = Path(cfg.paths.output_dir)
    rows, direction = [], None
    for name, spec in cfg.table.sets.items():
        source = str(held_out(cfg, str(name), spec.path, out)) if spec.held_out else spec.path
        summary, controls, results = run_set(cfg, str(name), source, spec.n, out, direction)
        saved = out / str(name) / DIRECTION
        direction = direction or (saved if saved.exists() else None)
        rows.append(row(str(name), summary, controls, results, cfg.table.bootstrap, cfg.seed))
    path = write(rows, out)
    print(f"table: {path}")
    return path


@hydra.main(version_base="1.3", config_path=CONF, config_name="table")
def main(cfg: DictConfig) -> None:
    build(cfg)


if __name__ == "__main__":
    main()
