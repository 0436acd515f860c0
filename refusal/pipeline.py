"""A run: set up the model, SAEs and engine, then the configured stages in order.

baseline judges every evaluation prompt; direction runs once; the per-prompt stages
(refusal.stages) run on the refused prompts, a chunk of them at a time (`search`), every
one appending its row to `results.jsonl` as it finishes. A resumed run skips every
(stage, prompt) already there.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from refusal import data, judge, models, report, saes, stages, tracking
from refusal.context import Context, Work
from refusal.engine import Engine
from refusal.errors import ConfigError
from refusal.forwards import Forwards
from refusal.interventions import Intervention
from refusal.records import (
    BaselineRecord,
    ControlsRecord,
    InteractionsRecord,
    PromptResult,
    Summary,
    join,
)
from refusal.rundir import RunDir
from refusal.stages import baseline
from refusal.stages import cards as cards_stage
from refusal.stages import controls as controls_stage
from refusal.stages import direction as direction_stage
from refusal.stages.stage import Stage

console = Console(stderr=True)

CHOICES = {
    "search.fm.target": ("bce", "mse"),
    "search.candidates.direction": ("selected", "per_layer"),
    "search.direction.on_none_admissible": ("warn", "error"),
    "judge.kind": ("markers", "classifier"),
}


def validate(cfg: DictConfig) -> None:
    """Reject settings outside their choices before anything slow happens."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value} is not one of {list(choices)}.")
    size = cfg.search.batch_size
    if size != "auto" and not (isinstance(size, int) and size > 0):
        raise ConfigError(f"search.batch_size={size} is neither a positive integer nor auto.")
    val, test = cfg.search.fm.val, cfg.search.fm.test
    if min(val, test) <= 0 or val + test >= 1:
        raise ConfigError(
            f"search.fm.val={val} and search.fm.test={test} must be shares above 0 that "
            "leave masks to train on (val + test < 1)."
        )
    step = cfg.search.fm.sample_step
    if not (isinstance(step, int) and step > 0):
        raise ConfigError(f"search.fm.sample_step={step} is not a positive number of masks.")
    together = cfg.search.prompts_together
    if not (isinstance(together, int) and together > 0):
        raise ConfigError(f"search.prompts_together={together} is not a positive number.")
    sets = cfg.search.controls.max_sets
    if not (isinstance(sets, int) and sets > 0):
        raise ConfigError(f"search.controls.max_sets={sets} is not a positive number of sets.")
    stages.check(list(cfg.search.stages))
    model = cfg.judge.verdict_model
    if model is not None and not Path(model).is_file():
        raise ConfigError(
            f"judge.verdict_model={model} is not a file: give a SignalModel JSON "
            "(python -m experiments.judge.fit writes one) or null for the shipped one."
        )


def intervention(cfg: DictConfig) -> Intervention:
    """The intervention `search.intervention` names, built from its section `search.<name>`."""
    name = cfg.search.intervention
    section = OmegaConf.select(cfg.search, str(name))
    if not isinstance(section, DictConfig) or "_target_" not in section:
        raise ConfigError(
            f"search.intervention={name} names no intervention: it must name a section of "
            "search with a _target_ in refusal.interventions (ablation, steer)."
        )
    built = hydra.utils.instantiate(section)
    built.check(f"search.{name}")
    return built


# keys that change how a run is watched, named or stored, not what it finds
UNSCORED = (
    *("resume", "logger", "paths.", "task_name", "tags", "optimized_metric", "overrides"),
    *("choices.", "search.batch_size", "search.compile", "search.fm.log_curves"),
    "trainer.enable_progress_bar",
)


def settings(cfg: DictConfig) -> dict:
    """The run's settings, flat, less the UNSCORED ones: what a resumed run must share."""
    return {k: v for k, v in tracking.flat_config(cfg).items() if not k.startswith(UNSCORED)}


def resuming(cfg: DictConfig) -> bool:
    """resume=true, or a re-launched multirun job whose directory already holds results."""
    if cfg.resume:
        return True
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    return hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN


def setup(cfg: DictConfig) -> Context:
    torch.manual_seed(cfg.seed)
    validate(cfg)
    edit = intervention(cfg)
    prompts = data.load(cfg.data)  # cheap checks first: a bad prompt file fails before loading
    models.check_layers(cfg.model, list(cfg.layers))
    with console.status(f"loading {cfg.model.name} and {len(cfg.layers)} SAE(s)"):
        lm = models.load(cfg.model, seed=cfg.seed)
        sae_by_layer = saes.load(cfg.sae, lm, list(cfg.layers), seed=cfg.seed)
    auto_batch = cfg.search.batch_size == "auto"
    # "auto": 64 for the batched full forwards; the first masks scored tune the engine's
    batch_size = 64 if auto_batch else cfg.search.batch_size
    markers = cfg.judge.markers or judge.REFUSAL_MARKERS
    engine = Engine(
        lm,
        sae_by_layer,
        edit,
        batch_size=batch_size,
        compile=cfg.search.compile,
        openings=judge.refusal_openings(lm, markers),
        tune=auto_batch,
    )
    refusal_ids = judge.refusal_token_ids(lm.tokenizer, list(cfg.judge.refusal_tokens))
    forwards = Forwards(lm, refusal_ids, batch_size)
    out = RunDir(cfg.paths.output_dir)
    out.claim(settings(cfg), resume=resuming(cfg))
    return Context(
        cfg,
        lm,
        engine,
        forwards,
        prompts,
        out,
        tracking.build(cfg, sae_width=next(iter(sae_by_layer.values())).cfg.d_sae),
        reply_judge(cfg.judge, markers, forwards),
        load_classifier(cfg.judge),
    )


def reply_judge(cfg: DictConfig, markers, forwards: Forwards) -> judge.ReplyJudge:
    """The three-verdict judge: `judge.verdict_model` (the shipped fit by default), with
    PMI read by the model under study unless `judge.pmi` is off."""
    return judge.ReplyJudge(cfg.verdict_model, markers, forwards if cfg.pmi else None)


def load_classifier(cfg: DictConfig) -> judge.ClassifierJudge | None:
    """The safety classifier of `judge=harmbench` / `judge=llamaguard`, else None."""
    if cfg.kind != "classifier":
        return None
    with console.status(f"loading the classifier judge {cfg.classifier.name}"):
        return judge.ClassifierJudge(models.load(cfg.classifier), cfg.classifier.format)


def search(ctx: Context, results: list[PromptResult], names: list[str]) -> Iterator[PromptResult]:
    """The per-prompt stages `names` on the refused prompts, those already written kept.

    Prompts go in chunks of `search.prompts_together`; each stage runs on every prompt of
    a chunk before the next stage starts, so that a stage which generates (verification)
    decodes the chunk's replies in one batch. Yields each result once its chunk is done.
    """
    size = ctx.cfg.search.prompts_together
    # the bar counts (stage, prompt) steps, done, run or skipped, and shows prompts:
    # whole steps, so that a resumed run's bar cannot run past its total
    form = "{l_bar}{bar}| {n:.1f}/{total:.0f} prompts [{elapsed}<{remaining}{postfix}]"
    steps = len(results) * len(names)
    scale = 1 / max(len(names), 1)
    with tqdm(total=steps, desc="search", bar_format=form, unit_scale=scale) as bar:
        for begin in range(0, len(results), size):
            works = [Work(ctx, r) for r in results[begin : begin + size]]
            for name in names:
                bar.set_postfix_str(name)
                stage = stages.PROMPT_STAGES[name]
                todo = [w for w in works if name not in w.result.stages and stage.applies(w.result)]
                bar.update(len(works) - len(todo))
                for batch in stage.batches(todo):
                    _run(ctx, stage, batch)
                    bar.update(len(batch))
            yield from (w.result for w in works)


def _run(ctx: Context, stage: Stage, works: list[Work]) -> None:
    """Run `stage` on `works` together and write its rows; prompts run together share the
    time and the engine evaluations equally."""
    evals, started = ctx.engine.evals, time.time()
    rows = stage.run_all(ctx, works)
    for work, row in zip(works, rows, strict=True):
        row.evals = (ctx.engine.evals - evals) // len(works)
        row.seconds = (time.time() - started) / len(works)
        work.result.add(ctx.record(row))


def summarize(
    ctx: Context, results: list[PromptResult], clock: Clock, checks: ControlsRecord | None
) -> Summary:
    return Summary.of(
        results,
        None if ctx.selection is None else ctx.selection.record(),
        checks,
        batch_size=ctx.engine.batch_size,  # as tuned, or halved on out-of-memory
        precision=str(ctx.lm.dtype).removeprefix("torch."),
        wall_seconds=time.time() - clock.started,
        stage_seconds=clock.seconds,
        judge_agreement=judge_agreement(ctx),
        seed=ctx.cfg.seed,
        versions={
            p: version(p) for p in ("torch", "transformers", "sae-lens", "lightning", "refusal")
        }
        | {"python": platform.python_version()},
        config=OmegaConf.to_container(
            OmegaConf.masked_copy(ctx.cfg, [str(k) for k in ctx.cfg if k != "hydra"]), resolve=True
        ),
    )


def judge_agreement(ctx: Context) -> float | None:
    """The three-verdict judge's cross-validated agreement with the labelled replies it was
    fitted on (None for a model fitted without them, or a classifier judge)."""
    if ctx.classifier is not None:
        return None
    agreement = ctx.judge.model.agreement
    return agreement["agreement"] if agreement else None


def print_table(results: list[PromptResult]) -> None:
    table = Table(title="refusal search, per prompt")
    for column in (
        "id",
        "refused",
        "score",
        "|M|",
        "after",
        "1-min",
        "FM AUC",
        "FM gain",
        "dormant",
        "random",
        "KL",
        "s",
        "instruction",
    ):
        wide = column == "instruction"
        table.add_column(column, no_wrap=True, overflow="ellipsis", max_width=48 if wide else None)
    for r in results:
        auc, kl = r.fm_auc, r.harmless_kl
        table.add_row(
            str(r.prompt_id),
            "yes" if r.baseline.refused else "no",
            f"{r.baseline.score:.2f}",
            str(r.greedy.size) if r.greedy and r.greedy.flips_all else "",
            str(r.verification.verdict_after) if r.verification else "",
            ("yes" if r.one_minimal else "no") if r.flip_verified else "",
            "" if auc is None else f"{auc:.2f}",
            _gain(r.interactions),
            str(len(r.dormant_features)) if r.dormant else "",
            _rate(r.random_control.flip_rate if r.random_control else None),
            "" if kl is None else f"{kl:.2f}",
            f"{r.seconds:.0f}" if r.searched else "",
            r.instruction[:50],
        )
    Console(width=max(console.width, 120)).print(table)  # one line per prompt, even in logs


def _rate(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _gain(fm: InteractionsRecord | None) -> str:
    """The FM's test AUC over the additive model's, starred where it is an interaction."""
    if fm is None or fm.interaction_gain is None:
        return ""
    return f"{fm.interaction_gain:+.2f}" + ("*" if fm.interactions_significant else "")


@dataclass
class Clock:
    """Wall-clock seconds of each part of a run, read off as each part ends."""

    started: float = field(default_factory=time.time)
    seconds: dict[str, float] = field(default_factory=dict)

    def lap(self, part: str) -> None:
        self.seconds[part] = time.time() - self.started - sum(self.seconds.values())


def run(cfg: DictConfig) -> float | None:
    """Run the configured stages; print the per-prompt table; return the optimised metric."""
    clock = Clock()
    ctx = setup(cfg)
    names = stages.check(list(cfg.search.stages))
    written = ctx.written()
    clock.lap("setup")
    results = join(
        baseline.run(ctx, {r.prompt_id: r for r in written if isinstance(r, BaselineRecord)})
        + [r for r in written if not isinstance(r, BaselineRecord)]
    )
    ctx.tracker.baseline([r.baseline for r in results])
    refused = [r for r in results if r.baseline.refused]
    per_prompt = [n for n in names if n in stages.PROMPT_STAGES]
    clock.lap("baseline")
    if not refused:
        console.print("[yellow]no evaluation prompt was refused at baseline: nothing to search.[/]")
    elif "direction" in names:
        ctx.tracker.direction(direction_stage.run(ctx))
        clock.lap("direction")
        for result in search(ctx, refused, per_prompt):
            ctx.tracker.prompt(result)
        clock.lap("search")
    checks = controls_stage.run(ctx, results) if refused and "controls" in names else None
    if checks is not None:
        clock.lap("controls")
    if refused and "cards" in names:
        cards_stage.run(ctx, results, checks)
        clock.lap("cards")
    summary = summarize(ctx, results, clock, checks)
    ctx.out.write_json("summary.json", summary.to_json())
    ctx.tracker.summary(summary)
    ctx.tracker.feature_sets()
    print_table(results)
    console.print(
        f"refused {summary.n_refused}/{summary.n_eval}; "
        f"jailbroken {summary.n_jailbroken} (judge: compliance), "
        f"unresolved {summary.n_unresolved}; "
        f"minimal set sizes {summary.minimal_set_sizes}; dormant {summary.n_dormant}; "
        f"median search {summary.median_seconds_per_prompt or 0:.0f} s/prompt. "
        f"Results in {ctx.out.path}"
    )
    console.print(f"Report: {report.write_quietly(ctx.out.path)}", soft_wrap=True, markup=False)
    ctx.tracker.finish()
    return getattr(summary, cfg.optimized_metric)
