"""Compare runs: per job (a sweep's layers or settings) the flip rate, minimal-set sizes,
FM test AUC and its gain over an additive model, dormant features and how much the
minimal sets agree; for one run, its prompts and the FM's pairwise-term heatmaps.

    python -m refusal.report outputs/train/multiruns/<date>      # a sweep, one row per job
    python -m refusal.report outputs/train/runs/<date>           # one run, one row per prompt
    python -m refusal.report --wandb ENTITY/PROJECT --group G --out DIR

It reads what the runs wrote (summary.json, results.jsonl: the source of truth) and
writes report.md, CSV tables and PNG plots into the directory (or --out). With --wandb it
reads the same summaries from W&B runs instead (those need to be uploaded: `wandb sync`).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Annotated, Any
from urllib.parse import urlparse

import pandas as pd
import wandb
import yaml
from hydra.experimental.callback import Callback
from matplotlib.figure import Figure
from omegaconf import DictConfig
from pydantic import BaseModel, BeforeValidator

from refusal import document as doc
from refusal.cards import SAVED as CARDS
from refusal.cards import CardsRecord, FeatureCard
from refusal.errors import RefusalError
from refusal.features import Feature
from refusal.records import (
    RESULTS,
    ControlsRecord,
    EditCost,
    FeatureField,
    InteractionsRecord,
    PromptResult,
    Summary,
    TransferMatrix,
    join,
    mean_or_none,
    parse_row,
)
from refusal.rundir import SETTINGS, RunDir
from refusal.tracking import heatmap_title, interaction_heatmap

log = logging.getLogger(__name__)


class WandbUnavailable(RefusalError):
    """W&B runs were asked for and cannot be read."""


class WandbSummary(BaseModel):
    """What the tracker mirrors of summary.json into a W&B run's summary, plus the verified
    minimal sets by prompt; a value it left out (None) reads as missing."""

    n_eval: int | None = None
    n_refused: int | None = None
    n_flipped_verified: int | None = None
    flip_rate: float | None = None
    minimal_set_sizes: list[int] = []
    fm_heldout_auc: list[float | None] = []
    median_interaction_gain: float | None = None
    n_interactions_significant: int | None = None
    harmless_kl: list[float | None] = []
    n_dormant: int | None = None
    evals_per_s: float | None = None
    wall_seconds: float | None = None
    # W&B hands nested summary values back as its own dict-like objects
    minimal_sets: Annotated[dict[int, list[FeatureField]], BeforeValidator(dict)] = {}


class JobConfig(BaseModel):
    """What the report reads of a job's config (summary.json's, or the W&B run's)."""

    layers: list[int] = []
    overrides: list[str] = []  # only the W&B config holds them (the tracker adds them)


@dataclass
class Job:
    """One run of a sweep, as the report sees it."""

    name: str  # its directory relative to the sweep (or the W&B run id)
    summary: Summary | WandbSummary
    layers: list[int]
    overrides: list[str] = field(default_factory=list)
    prompts: list[dict[str, Any]] = field(default_factory=list)  # rows of report_prompts.csv
    minimal: dict[int, list[Feature]] = field(default_factory=dict)  # of the verified flips
    interactions: dict[int, InteractionsRecord] = field(default_factory=dict)  # FM, per prompt
    controls: ControlsRecord | None = None  # controls.json, where the controls stage ran
    replies: list[doc.Reply] = field(default_factory=list)  # clean and with M ablated
    cards: list[FeatureCard] = field(default_factory=list)  # cards.json, where it was written
    label: str = ""  # what sets it apart from the other jobs

    def minimal_sets(self) -> dict[int, set[Feature]]:
        """Minimal sets of the prompts whose flip was verified by generation."""
        return {pid: set(features) for pid, features in self.minimal.items()}


def find_runs(root: Path) -> list[Path]:
    """Run directories at or under root (those holding a summary.json), in job order."""
    paths = {p.parent for p in root.rglob("summary.json") if "wandb" not in p.parts}
    return sorted(paths, key=lambda p: _natural(p.relative_to(root)))


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def load_run(path: Path, root: Path) -> Job:
    """A job from its run directory: summary, per-prompt results and Hydra overrides."""
    summary = Summary.model_validate_json((path / "summary.json").read_text(encoding="utf-8"))
    controls_file = path / "controls.json"
    return job(
        str(path.relative_to(root)) if path != root else path.name,
        summary,
        join([parse_row(row) for row in RunDir(path).read(RESULTS)]),
        overrides(path),
        ControlsRecord.model_validate_json(controls_file.read_text())
        if controls_file.exists()
        else None,
        feature_cards(path),
    )


def job(
    name: str,
    summary: Summary,
    results: list[PromptResult],
    overrides: list[str],
    controls: ControlsRecord | None,
    cards: list[FeatureCard],
) -> Job:
    return Job(
        name=name,
        summary=summary,
        layers=JobConfig.model_validate(summary.config).layers,
        overrides=overrides,
        prompts=[prompt_row(r) for r in results],
        minimal={r.prompt_id: r.minimal for r in results if r.flip_verified},
        interactions={r.prompt_id: r.interactions for r in results if r.interactions is not None},
        controls=controls,
        replies=[reply(r) for r in results if r.verification is not None],
        cards=cards,
    )


def overrides(path: Path) -> list[str]:
    file = path / ".hydra" / "overrides.yaml"
    return yaml.safe_load(file.read_text()) if file.exists() else []


def feature_cards(path: Path) -> list[FeatureCard]:
    file = path / CARDS
    return CardsRecord.model_validate_json(file.read_text()).cards if file.exists() else []


def shard_of(path: Path) -> str | None:
    """The run's `data.shard` ("i/n"), read from its settings.json; None if unsharded."""
    file = path / SETTINGS
    return json.loads(file.read_text()).get("data.shard") if file.exists() else None


def studies(runs: list[Path]) -> list[list[Path]]:
    """The runs grouped by study: the shards of one (the same settings but `data.shard`)
    together, every other run alone."""
    groups: dict[str, list[Path]] = {}
    for path in runs:
        key = str(path)
        if shard_of(path) is not None:
            settings = json.loads((path / SETTINGS).read_text())
            key = json.dumps({k: v for k, v in settings.items() if k != "data.shard"}, default=str)
        groups.setdefault(key, []).append(path)
    return list(groups.values())


def load_shards(paths: list[Path], root: Path) -> Job:
    """The shards of one study as one job: their results joined and summarised again
    (shards_summary.json in root). The run-level controls are each shard's own, over its
    prompts only, so the merged summary leaves their numbers out."""
    summaries = [Summary.model_validate_json((p / "summary.json").read_text()) for p in paths]
    results = join([parse_row(row) for p in paths for row in RunDir(p).read(RESULTS)])
    first = summaries[0]
    config = json.loads(json.dumps(first.config))
    config.get("data", {})["shard"] = None
    summary = Summary.of(
        sorted(results, key=lambda r: r.prompt_id),
        None,
        batch_size=first.batch_size,
        precision=first.precision,
        wall_seconds=max(s.wall_seconds for s in summaries),
        seed=first.seed,
        versions=first.versions,
        config=config,
        judge_agreement=first.judge_agreement,
    ).model_copy(update={"direction": first.direction})
    (root / "shards_summary.json").write_text(json.dumps(summary.to_json(), indent=2))
    shards = sorted(str(shard_of(p)) for p in paths)
    unsharded = [o for o in overrides(paths[0]) if not o.startswith("data.shard=")]
    cards = [card for p in paths for card in feature_cards(p)]
    return job(f"shards {', '.join(shards)}", summary, results, unsharded, None, cards)


def reply(result: PromptResult) -> doc.Reply:
    """A searched prompt's clean reply and its reply with M ablated."""
    assert result.verification is not None and result.greedy is not None
    return doc.Reply(
        prompt_id=result.prompt_id,
        instruction=result.instruction,
        before=result.baseline.reply,
        after=result.verification.reply_after,
        verdict_after=str(result.verification.verdict_after),
        minimal=_text(result.greedy.minimal),
    )


def prompt_row(result: PromptResult) -> dict[str, Any]:
    """One evaluation prompt: its baseline judgement and, when refused, its search."""
    verified, fm = result.flip_verified, result.interactions
    return {
        "prompt_id": result.prompt_id,
        "refused": result.baseline.refused,
        "score": result.baseline.score,
        "verdict_after": str(result.verification.verdict_after) if result.verification else None,
        "flip_verified": verified,
        "one_minimal": result.one_minimal if verified else None,
        "size": len(result.minimal) if verified else None,
        "minimal": _text(result.minimal),
        "evals": result.evals if result.searched else None,
        "fm_auc": result.fm_auc,  # on the FM's test masks
        "additive_auc": fm.additive_test_auc if fm else None,
        "all_of_m_auc": fm.all_of_m_auc if fm else None,
        "interaction_gain": fm.interaction_gain if fm else None,
        "interactions_significant": fm.interactions_significant if fm else None,
        "n_dormant": len(result.dormant_features) if result.dormant is not None else None,
        "random_flip_rate": result.random_control.flip_rate if result.random_control else None,
        "harmless_kl": result.harmless_kl,
        "instruction": result.instruction,
    }


def _text(features: list[Feature]) -> str:
    return " ".join(str(f) for f in features)


def load_jobs(root: Path) -> list[Job]:
    runs = find_runs(root)
    if not runs:
        raise RefusalError(
            f"{root} holds no run: no summary.json at or below it. Pass a run directory "
            "(outputs/<task>/runs/<date>) or a sweep directory (outputs/<task>/multiruns/<date>)."
        )
    return label(
        [load_run(g[0], root) if len(g) == 1 else load_shards(g, root) for g in studies(runs)]
    )


def label(jobs: list[Job]) -> list[Job]:
    """Label each job by its name and the overrides that differ between jobs
    (`1: layers=[12]`), so plots and tables say what was swept."""
    everywhere = set.intersection(*(set(j.overrides) for j in jobs))
    for job in jobs:
        varying = " ".join(o for o in job.overrides if o not in everywhere)
        job.label = f"{job.name}: {varying}" if varying and len(jobs) > 1 else job.name
    return jobs


def jobs_table(jobs: list[Job]) -> pd.DataFrame:
    """One row per job: what it flipped, how small the sets, how well the FM predicts."""
    rows = []
    for job in jobs:
        s, sizes = job.summary, job.summary.minimal_set_sizes
        rows.append(
            {
                "job": job.label,
                "path": job.name,
                "layers": " ".join(map(str, job.layers)),
                "n_eval": s.n_eval,
                "n_refused": s.n_refused,
                "n_flipped": s.n_flipped_verified,
                "flip_rate": s.flip_rate,
                "mean_set_size": mean_or_none(sizes),
                "median_set_size": median(sizes) if sizes else None,
                "fm_auc": mean_or_none(s.fm_heldout_auc),
                "fm_interaction_gain": s.median_interaction_gain,
                "n_fm_interactions": s.n_interactions_significant,
                "n_dormant": s.n_dormant,
                "harmless_kl": mean_or_none(s.harmless_kl),
                "evals_per_s": s.evals_per_s,
                "wall_seconds": s.wall_seconds,
            }
        )
    return pd.DataFrame(rows)


def prompts_table(jobs: list[Job]) -> pd.DataFrame:
    return pd.DataFrame([{"job": job.label, **p} for job in jobs for p in job.prompts])


def overlap(jobs: list[Job]) -> pd.DataFrame:
    """For each pair of jobs: the mean Jaccard of their minimal sets over the prompts both
    flipped, how many features their minimal sets share (any prompt), and the Jaccard of
    the prompts they flipped. Features of different layers never coincide, so for a layer
    sweep the prompt Jaccard is the telling one."""
    sets = [job.minimal_sets() for job in jobs]
    rows = []
    for a, job_a in enumerate(jobs):
        for b, job_b in enumerate(jobs):
            common = sets[a].keys() & sets[b].keys()
            flipped = sets[a].keys() | sets[b].keys()
            features_a = set().union(*sets[a].values())
            features_b = set().union(*sets[b].values())
            rows.append(
                {
                    "job_a": job_a.label,
                    "job_b": job_b.label,
                    "minimal_set_jaccard": mean_or_none(
                        [_jaccard(sets[a][p], sets[b][p]) for p in common]
                    ),
                    "shared_features": len(features_a & features_b),
                    "flipped_prompt_jaccard": len(common) / len(flipped) if flipped else None,
                }
            )
    return pd.DataFrame(rows)


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def _present(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def metrics_figure(jobs: list[Job]) -> Figure:
    """Flip rate, minimal-set sizes, FM test AUC and dormant count, per job."""
    labels = [job.label for job in jobs]
    fig = Figure(figsize=(max(8.0, 1.6 * len(jobs) + 4), 7), layout="constrained")
    (flips, sizes), (aucs, dormant) = fig.subplots(2, 2)
    flips.bar(labels, [job.summary.flip_rate or 0.0 for job in jobs])
    flips.set(title="flip rate (verified flips / refused)", ylim=(0, 1))
    _distribution(sizes, labels, [j.summary.minimal_set_sizes for j in jobs])
    sizes.set(title="minimal-set size |M|")
    _distribution(aucs, labels, [_present(j.summary.fm_heldout_auc) for j in jobs])
    aucs.set(title="FM test AUC", ylim=(0, 1.05))
    dormant.bar(labels, [job.summary.n_dormant or 0 for job in jobs])
    dormant.set(title="dormant features")
    for ax in (flips, sizes, aucs, dormant):
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    return fig


def _distribution(ax, labels: list[str], values: Sequence[Sequence[float]]) -> None:
    """Every value as a dot over a box plot (a box needs values; an empty job gets none)."""
    positions = list(range(len(labels)))
    filled = [(x, v) for x, v in zip(positions, values) if v]
    if filled:
        ax.boxplot([v for _, v in filled], positions=[x for x, _ in filled], widths=0.5)
    for x, v in filled:
        ax.plot([x] * len(v), v, "o", alpha=0.5, color="tab:blue")
    ax.set_xticks(positions, labels)
    ax.set_xlim(-0.5, len(labels) - 0.5)


def overlap_figure(table: pd.DataFrame, labels: list[str]) -> Figure:
    fig = Figure(figsize=(15, 5), layout="constrained")
    for ax, column in zip(fig.subplots(1, 3), OVERLAP_COLUMNS):
        matrix = table.pivot(index="job_a", columns="job_b", values=column).loc[labels, labels]
        jaccard = column.endswith("jaccard")  # on 0..1; counts from 0
        image = ax.imshow(
            matrix.to_numpy(dtype=float), cmap="viridis", vmin=0, vmax=1 if jaccard else None
        )
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(column.replace("_", " "))
        fig.colorbar(image, ax=ax)
    return fig


FM_NOTE = (
    "A prompt's pairwise terms are interactions only where the FM's test AUC beats the "
    "same model without them (`interaction_gain`, bootstrap 95% interval above zero: "
    "`interactions_significant`); elsewhere the test masks show none (main effects alone "
    "rank the flips as well or better, or a test split of one class gave no AUC)."
)
OVERLAP_COLUMNS = ["minimal_set_jaccard", "shared_features", "flipped_prompt_jaccard"]
CARDS_NOTE = (
    "Every feature of a jailbroken prompt's minimal set, of the shared set and of a dormant "
    "list: the tokens its decoder row promotes and suppresses through the unembedding, its "
    "activation over the prompt it was found on, and where it fires most in the run's own "
    "prompt sets and clean replies (special tokens read 0: the SAEs never saw them)."
)


def write(jobs: list[Job], out: Path, source: str) -> Path:
    """report.md and report.html with their CSV tables and PNG plots in out; returns the
    Markdown report's path."""
    out.mkdir(parents=True, exist_ok=True)
    table = jobs_table(jobs)
    table.to_csv(out / "report.csv", index=False)
    metrics_figure(jobs).savefig(out / "report_metrics.png", dpi=120)
    blocks: list[doc.Block] = [
        doc.Heading(f"refusal report: {source}", 1),
        doc.Text(f"{len(jobs)} run(s). Written from their summaries and per-prompt results."),
        doc.Heading("Per job" if len(jobs) > 1 else "Summary"),
        doc.Table(table.drop(columns="path")),  # the CSV keeps it
        doc.Image("report_metrics.png", "flip rate, minimal-set sizes, FM AUC, dormant features"),
    ]
    if len(jobs) > 1:
        blocks += _overlap_section(jobs, out)
    prompts = prompts_table(jobs)
    if not prompts.empty:
        prompts.to_csv(out / "report_prompts.csv", index=False)
    if len(jobs) == 1 and not prompts.empty:
        blocks += _run_section(jobs[0], prompts.drop(columns="job"), out)
    (out / "report.html").write_text(doc.to_html(blocks, out, source), encoding="utf-8")
    path = out / "report.md"
    path.write_text(doc.to_markdown(blocks), encoding="utf-8")
    return path


def _overlap_section(jobs: list[Job], out: Path) -> list[doc.Block]:
    table = overlap(jobs)
    table.to_csv(out / "report_overlap.csv", index=False)
    labels = [job.label for job in jobs]
    overlap_figure(table, labels).savefig(out / "report_overlap.png", dpi=120)
    blocks: list[doc.Block] = [doc.Heading("How the minimal sets of different jobs overlap")]
    for column in OVERLAP_COLUMNS:
        matrix = table.pivot(index="job_a", columns="job_b", values=column).loc[labels, labels]
        blocks += [doc.Text(column.replace("_", " ")), doc.Table(matrix.reset_index())]
    return [*blocks, doc.Image("report_overlap.png", "overlap")]


def controls_table(checks: ControlsRecord, summary: Summary) -> pd.DataFrame:
    """One row per edit: how often it jailbreaks, and what it costs on harmless prompts."""
    rows = []

    def add(edit: str, rate: float | None, cost: EditCost | None, note: str) -> None:
        costs = cost.model_dump(exclude={"n_prompts", "n_edits"}) if cost else {}
        rows.append({"edit": edit, "jailbreak_rate": rate, **costs, "note": note})

    clean = checks.clean_harmless_refusal_rate
    if clean is not None:
        none = EditCost(harmless_kl=0.0, delta_ce=0.0, harmless_refusal_rate=clean, n_prompts=0)
        add("no edit", None, none, "the harmless prompts, clean")
    m_cost, r_cost = checks.minimal_cost, checks.random_cost
    add(
        "each prompt's M",
        summary.jailbreak_rate,
        m_cost,
        "of the refused prompts" + (f"; cost: mean of {m_cost.n_edits} Ms" if m_cost else ""),
    )
    add(
        "random sets shaped like M",
        summary.random_jailbreak_rate,
        r_cost,
        f"cost: the first draws of {r_cost.n_edits} Ms" if r_cost else "",
    )
    if checks.transfer:
        t = checks.transfer
        add(
            "M on the other prompts",
            t.rate,
            None,
            f"Ms of {len(t.sources)} prompts on {len(t.targets)}; "
            f"{t.n_jailbroken_judged}/{t.n_judged} judged flips compliance",
        )
    if checks.shared:
        s = checks.shared
        names = " ".join(str(f) for f in s.features)
        add(
            "shared set (held-out half)",
            s.jailbreak_rate,
            s.cost,
            f"{names}; fitted on {len(s.fit_prompts)} prompts; "
            f"induces refusal {s.induced_refusal_rate:.2f}",
        )
    if checks.direction:
        d = checks.direction
        add(
            "refusal direction",
            d.jailbreak_rate,
            d.cost,
            f"{d.n_jailbroken}/{d.n_prompts} refused prompts",
        )
    return pd.DataFrame(rows)


def transfer_figure(t: TransferMatrix) -> Figure:
    """Rows: the prompt whose M is ablated; columns: the prompt it is ablated on."""
    figure = Figure(figsize=(1.2 + 0.35 * len(t.targets), 1.0 + 0.35 * len(t.sources)))
    ax = figure.subplots()
    ax.imshow(
        [[float(f) for f in row] for row in t.flips], cmap="Greys", vmin=0, vmax=1, aspect="auto"
    )
    ax.set_xticks(range(len(t.targets)), [str(p) for p in t.targets])
    ax.set_yticks(range(len(t.sources)), [str(p) for p in t.sources])
    ax.set_xlabel("prompt ablated on")
    ax.set_ylabel("M of prompt")
    ax.set_title("transfer: opening score flips (black)")
    figure.tight_layout()
    return figure


def _controls_section(checks: ControlsRecord, summary: Summary, out: Path) -> list[doc.Block]:
    blocks: list[doc.Block] = [doc.Heading("Controls"), doc.Table(controls_table(checks, summary))]
    if checks.transfer and checks.transfer.flips:
        transfer_figure(checks.transfer).savefig(out / "report_transfer.png", dpi=120)
        blocks.append(doc.Image("report_transfer.png", "transfer"))
    return blocks


def _run_section(job: Job, prompts: pd.DataFrame, out: Path) -> list[doc.Block]:
    blocks: list[doc.Block] = [doc.Heading("Prompts"), doc.Table(prompts)]
    if job.replies:
        blocks += [doc.Heading("Replies before and after"), doc.Replies(job.replies)]
    if job.controls and isinstance(job.summary, Summary):
        blocks += _controls_section(job.controls, job.summary, out)
    if job.interactions:
        blocks += [doc.Heading("FM pairwise terms"), doc.Text(FM_NOTE)]
    for pid, readout in sorted(job.interactions.items()):
        name = f"report_fm_prompt_{pid}.png"
        minimal = set(job.minimal.get(pid, []))
        labels = [f"{f} [M]" if f in minimal else str(f) for f in readout.features]
        figure = interaction_heatmap(readout.interactions, labels, heatmap_title(pid, readout))
        figure.savefig(out / name, dpi=120)
        blocks.append(doc.Image(name, f"prompt {pid} (features of M marked [M])"))
    if job.cards:
        blocks += [doc.Heading("Feature cards"), doc.Text(CARDS_NOTE)]
        blocks += [doc.Card(card) for card in job.cards]
    return blocks


def write_quietly(run_dir: Path) -> Path | None:
    """The report of a finished run; a failure is logged, never raised (it can be rebuilt)."""
    try:
        return write(load_jobs(run_dir), run_dir, str(run_dir))
    except Exception as error:  # the run's results are written already
        log.warning(
            "report failed (%r); rebuild it with: python -m refusal.report %s", error, run_dir
        )
        return None


class SweepReport(Callback):
    """Hydra callback: after a multirun, the sweep's report in its sweep directory."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        path = write_quietly(sweep)
        if path is not None:
            log.info("sweep report: %s", path)


def wandb_api(timeout: float = 3.0) -> wandb.Api:
    """wandb.Api, after checking quickly that the W&B server can be reached and logged in to."""
    url = wandb.Settings().base_url
    host = urlparse(url).hostname or url
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as error:
        raise WandbUnavailable(
            f"cannot reach the W&B server {url} ({error}). Build the report from the run "
            "directories instead: python -m refusal.report <run or sweep dir> (they hold "
            "everything W&B has), or upload offline runs later with `wandb sync`."
        ) from None
    try:
        return wandb.Api(timeout=20)
    except wandb.errors.UsageError as error:
        raise WandbUnavailable(
            f"W&B refused the login ({error}). Set WANDB_API_KEY or run `wandb login`."
        ) from None


def load_wandb(path: str, group: str | None) -> list[Job]:
    """Jobs from the W&B runs of ENTITY/PROJECT (of one group): summaries and minimal sets."""
    runs = wandb_api().runs(path, filters={"group": group} if group else None)
    jobs = [_wandb_job(run) for run in runs]
    if not jobs:
        raise WandbUnavailable(f"W&B has no runs in {path}" + (f" group {group}" if group else ""))
    return label(jobs)


def _wandb_job(run) -> Job:
    # the tracker put summary.json's keys and the minimal sets in the run's summary
    summary = WandbSummary.model_validate(dict(run.summary))
    config = JobConfig.model_validate(dict(run.config))
    return Job(
        name=run.id,
        summary=summary,
        layers=config.layers,
        overrides=config.overrides,
        prompts=[
            {"prompt_id": pid, "flip_verified": True, "minimal": _text(minimal)}
            for pid, minimal in summary.minimal_sets.items()
        ],
        minimal=summary.minimal_sets,
    )


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m refusal.report", description=__doc__)
    parser.add_argument("path", nargs="?", type=Path, help="a run or sweep directory")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read W&B runs instead")
    parser.add_argument("--group", help="with --wandb: only this group (a sweep)")
    parser.add_argument("--out", type=Path, help="where to write (default: the directory)")
    args = parser.parse_args(argv)
    if (args.path is None) == (args.wandb is None):
        parser.error("give a run or sweep directory, or --wandb ENTITY/PROJECT")
    try:
        if args.wandb:
            jobs, source = load_wandb(args.wandb, args.group), f"W&B {args.wandb}"
            out = args.out or Path("outputs") / "reports" / args.wandb.replace("/", "_")
        else:
            jobs, source, out = load_jobs(args.path), str(args.path), args.out or args.path
        path = write(jobs, out, source)
    except RefusalError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    main()
