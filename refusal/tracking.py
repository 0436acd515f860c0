"""W&B: a mirror of a run's records (the run directory, refusal.rundir, stays the source
of truth).

The W&B run (conf/logger/wandb.yaml: offline unless WANDB_API_KEY is set) lives inside
the run directory and mirrors each stage as it finishes: baseline and direction tables,
one row per searched prompt, the FM's training curves, interaction heatmaps and top
pairs, dormant features and the run summary. A W&B error is logged as a warning and
never ends a run.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import hydra
import wandb
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import Logger, WandbLogger
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from refusal import saes
from refusal.direction import Selection
from refusal.features import Feature
from refusal.records import (
    BaselineRecord,
    DormantFeature,
    FMReadout,
    GreedyRecord,
    PromptResult,
    Summary,
    mean_or_none,
)

log = logging.getLogger(__name__)
console = Console(stderr=True)
NEURONPEDIA = "https://www.neuronpedia.org"

# Columns of the per-prompt W&B tables, and the summary keys mirrored from summary.json.
SEARCH_COLUMNS = [
    "prompt_id",
    "instruction",
    "clean_score",
    "candidates",
    "n_candidates",
    "minimal",
    "neuronpedia",
    "size",
    "one_minimal_by_score",
    "one_minimal",
    "score_after",
    "evals",
    "seconds",
    "reply_before",
    "reply_after",
    "verdict_before",
    "verdict_after",
    "flip_verified",
    "fm_test_auc",
    "fm_additive_test_auc",
    "fm_all_of_m_auc",
    "fm_interaction_gain",
    "fm_interactions_significant",
    "n_dormant",
    "random_flip_rate",
    "harmless_kl",
]
DORMANT_COLUMNS = [
    "prompt_id",
    "feature",
    "layer",
    "latent",
    "before",
    "after",
    "score_without",
    "score_with",
    "effect",
    "null_percentile",
    "setting",
    "verdict_with",
    "neuronpedia",
]
# The FM's test numbers: `fm/<key>` per prompt, and `fm_<key>` columns of search/prompts.
FM_METRICS = ["test_auc", "additive_test_auc", "all_of_m_auc", "interaction_gain"]
# Per-prompt scalars, plotted against `prompt_idx` (the prompt's id), not the FM's steps.
STEP = "prompt_idx"
PROMPT_METRICS = [
    *(f"fm/{key}" for key in FM_METRICS),
    "prompt/minimal_set_size",
    "prompt/jailbroken",
    "prompt/score_after",
    "prompt/n_dormant",
    "prompt/random_flip_rate",
    "prompt/harmless_kl",
    "prompt/seconds",
]
# Files of the run directory that make up its `feature_sets` artifact, where present.
FEATURE_SET_FILES = ["summary.json", "results.jsonl", "direction.json", "controls.json"]
SUMMARY_KEYS = [
    "n_eval",
    "n_refused",
    "n_flipped_verified",
    "flip_rate",
    "n_jailbroken",
    "jailbreak_rate",
    "n_unresolved",
    "one_minimal_rate",
    "judge_agreement",
    "all_minimal_verified",
    "n_dormant",
    "evals_per_s",
    "wall_seconds",
    "minimal_set_sizes",
    "fm_heldout_auc",
    "median_interaction_gain",
    "n_interactions_significant",
    "harmless_kl",
    "random_flip_rate",
    "random_jailbreak_rate",
    "transfer_rate",
    "shared_set_size",
    "shared_set_jailbreak_rate",
    "direction_jailbreak_rate",
]


def neuronpedia_url(np_id: str | None, feature: Feature) -> str:
    """The feature's Neuronpedia page, or "" when its SAE is not on Neuronpedia."""
    return f"{NEURONPEDIA}/{np_id}/{feature.latent}" if np_id else ""


def heatmap_title(prompt_id: int, readout: FMReadout) -> str:
    """What the FM's pairwise terms are: interactions only where they beat the additive
    model on the test masks (the gain's interval above zero)."""
    gain, interval = readout.interaction_gain, readout.gain_interval
    measured = (
        f"AUC gain over additive {gain:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}]"
        if gain is not None and interval is not None
        else "AUC gain not measured"
    )
    if readout.interactions_significant:
        return f"prompt {prompt_id}: FM interactions ({measured})"
    return f"prompt {prompt_id}: FM pairwise terms, no interaction shown ({measured})"


def interaction_heatmap(matrix: list[list[float]], labels: list[str], title: str) -> Figure:
    """The FM's pairwise ⟨vᵢ,vⱼ⟩ as a diverging heatmap (no pyplot: safe in any thread)."""
    size = min(14.0, 3.0 + 0.35 * len(labels))
    fig = Figure(figsize=(size + 1.5, size), layout="constrained")
    ax = fig.subplots()
    bound = max((abs(v) for row in matrix for v in row), default=0.0) or 1.0
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-bound, vmax=bound)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="⟨vᵢ, vⱼ⟩")
    return fig


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The composed job config, resolved and flattened (`search.fm.rank`), plus the
    chosen config options and command-line overrides, so dashboards can group by them."""
    job = OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"])
    flat = _flatten(cast(dict[str, Any], OmegaConf.to_container(job, resolve=True)))
    hc = _hydra()
    if hc is not None:
        flat["overrides"] = list(hc.overrides.task)
        flat |= {f"choices.{k}": v for k, v in hc.runtime.choices.items() if "/" not in k}
    return flat


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _hydra():
    return HydraConfig.get() if HydraConfig.initialized() else None


def run_identity(cfg: DictConfig, wandb_cfg: DictConfig) -> dict[str, Any]:
    """W&B tags (the run's `tags`, the logger's, plus model, SAE and layers) and, unless configured,
    name and group: a multirun's jobs share a group (task/<sweep dir>) and are named by
    their overrides."""
    hc = _hydra()
    sae = (hc.runtime.choices.get("sae") if hc else None) or cfg.sae.get("release") or cfg.sae.kind
    derived = [f"model={cfg.model.name}", f"sae={sae}", *(f"layer={i}" for i in cfg.layers)]
    configured = [*(cfg.get("tags") or []), *(wandb_cfg.get("tags") or [])]
    identity: dict[str, Any] = {"tags": list(dict.fromkeys([*configured, *derived]))}
    if hc is not None and hc.mode == RunMode.MULTIRUN:
        sweep = Path(hc.runtime.output_dir).parent.name
        identity["group"] = wandb_cfg.get("group") or f"{cfg.task_name}/{sweep}"
        identity["name"] = (
            wandb_cfg.get("name") or f"job{hc.job.num} {hc.job.override_dirname}".strip()
        )
    return identity


def _warn(what: str, error: Exception) -> None:
    log.warning("W&B %s failed (%r); the results are safe in the run directory.", what, error)


def _guarded(method: Callable) -> Callable:
    """A tracker method that does nothing without a W&B run and warns instead of raising."""

    @functools.wraps(method)
    def call(self: Tracker, *args, **kwargs):
        if self.run is None:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as error:  # tracking must never cost a run its results
            _warn(method.__name__, error)
            return None

    return call


class FMLogger(WandbLogger):
    """One prompt's FM training curves (`fm/prompt_<id>/val_loss`) in the run's W&B run."""

    LOGGER_JOIN_CHAR = "/"

    def log_hyperparams(self, params: Any) -> None:
        """Skipped: the run's config is the Hydra config, FM settings included."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        try:
            super().log_metrics(metrics, step)
        except Exception as error:  # a W&B error must not stop the FM's training
            _warn("FM metrics", error)


class Tracker:
    """Mirrors a run's results to W&B, stage by stage; without a W&B run it does nothing.

    Tables that grow a row per prompt are W&B incremental tables, logged after each prompt.
    """

    def __init__(
        self,
        run: Any = None,
        fm_logger_cfgs: list[DictConfig] | None = None,
        neuronpedia_ids: dict[int, str | None] | None = None,
        out_dir: Path | None = None,
        fm_curves: bool = False,
        log_model: bool = False,
    ):
        self.run = run
        self.fm_logger_cfgs = fm_logger_cfgs or []
        self.neuronpedia_ids = neuronpedia_ids or {}
        self.out_dir = out_dir  # the run directory, whose files the artifacts hold
        self.fm_curves = fm_curves  # each prompt's FM training curves (fm/prompt_<id>/...)
        self.log_model = log_model  # each FM's checkpoint as a W&B model artifact
        self.minimal_sets: dict[int, list[str]] = {}  # verified flips' M, for the summary
        self.tables: dict[str, wandb.Table] = {}
        self._define_steps()

    @_guarded
    def _define_steps(self) -> None:
        self.run.define_metric(STEP)
        for key in PROMPT_METRICS:  # exact names: they win over Lightning's "*" glob
            self.run.define_metric(key, step_metric=STEP)

    def url(self, feature: Feature) -> str:
        return neuronpedia_url(self.neuronpedia_ids.get(feature.layer), feature)

    def fm_loggers(self, prompt_id: int) -> list[Logger]:
        """Lightning loggers for one prompt's FM: the W&B run plus the other conf/logger
        entries, each instantiated with version `fm_prompt_<id>` (CSV, TensorBoard)."""
        loggers = [
            hydra.utils.instantiate(c, version=f"fm_prompt_{prompt_id}")
            for c in self.fm_logger_cfgs
        ]
        if self.run is not None and self.fm_curves:
            loggers.append(FMLogger(experiment=self.run, prefix=f"fm/prompt_{prompt_id}"))
        return loggers

    def _grow(self, key: str, columns: list[Any], rows: list[list]) -> dict[str, wandb.Table]:
        """Add rows to an incremental table; the returned entry logs them."""
        if not rows:
            return {}
        table = self.tables.setdefault(
            key, wandb.Table(columns=columns, log_mode="INCREMENTAL", allow_mixed_types=True)
        )
        for row in rows:
            table.add_data(*row)
        return {key: table}

    @_guarded
    def baseline(self, rows: list[BaselineRecord]) -> None:
        columns: list[Any] = ["prompt_id", "instruction", "score", "refused", "reply"]
        data = [[r.prompt_id, r.instruction, r.score, r.refused, r.reply] for r in rows]
        self.run.log({"baseline/prompts": wandb.Table(columns=columns, data=data)})
        self.run.summary.update(
            {"baseline/n_eval": len(rows), "baseline/n_refused": sum(r.refused for r in rows)}
        )

    @_guarded
    def direction(self, selection: Selection) -> None:
        """Every (layer, position) candidate's bypass / induce / KL, the chosen one and how."""
        chosen = (selection.layer, selection.position)
        rows = [
            [s.layer, s.position, s.bypass, s.induce, s.kl, (s.layer, s.position) == chosen]
            for s in selection.scores
        ]
        columns: list[Any] = ["layer", "position", "bypass", "induce", "kl", "chosen"]
        self.run.log({"direction/scores": wandb.Table(columns=columns, data=rows)})
        self.run.summary.update(
            {
                "direction/layer": selection.layer,
                "direction/position": selection.position,
                "direction/admissible": selection.admissible,
                "direction/chosen_by": selection.chosen_by,
            }
        )

    @_guarded
    def prompt(self, result: PromptResult) -> None:
        """One searched prompt: its candidates, minimal set, FM readout and dormant features."""
        pid, greedy, readout = result.prompt_id, result.greedy, result.interactions
        if greedy is None:  # every per-prompt stage needs greedy: only the baseline ran
            return
        if result.flip_verified:
            self.minimal_sets[pid] = [str(f) for f in result.minimal]
        payload: dict[str, Any] = self._grow(
            "search/prompts", SEARCH_COLUMNS, [self._search_row(result, greedy)]
        )
        scored = [(c.feature, c.cos) for c in greedy.candidates]
        payload |= self._feature_table("direction/candidates", "cos", result, scored)
        payload |= self._grow(
            "fm/top_pairs",
            ["prompt_id", "a", "b", "interaction", "neuronpedia_a", "neuronpedia_b"],
            [
                [pid, str(p.a), str(p.b), p.interaction, self.url(p.a), self.url(p.b)]
                # pairs only where they are interactions (beat the additive model)
                for p in (readout.top_pairs if readout and readout.interactions_significant else [])
            ],
        )
        payload |= self._grow(
            "dormant/features",
            DORMANT_COLUMNS,
            [self._dormant_row(pid, d) for d in result.dormant_features],
        )
        if readout is not None:
            labels = [str(f) for f in readout.features]
            title = heatmap_title(pid, readout)
            figure = interaction_heatmap(readout.interactions, labels, title)
            payload["fm/interactions"] = wandb.Image(figure, caption=title)
            effects = [(e.feature, e.w) for e in readout.main_effects]
            payload |= self._feature_table("fm/main_effects", "w", result, effects)
            self._log_fm_checkpoint(pid)
        scalars = {STEP: pid} | prompt_scalars(result, greedy)
        self.run.log(payload | {k: v for k, v in scalars.items() if v is not None})

    def _feature_table(
        self, key: str, value: str, result: PromptResult, scored: list[tuple[Feature, float]]
    ) -> dict[str, wandb.Table]:
        """A prompt's (feature, value) rows, marked where the feature is in greedy's M."""
        pid, minimal = result.prompt_id, set(result.greedy.minimal if result.greedy else [])
        columns: list[Any] = ["prompt_id", "feature", "layer", "latent", value, "in_minimal"]
        rows = [[pid, str(f), f.layer, f.latent, v, f in minimal, self.url(f)] for f, v in scored]
        return self._grow(key, [*columns, "neuronpedia"], rows)

    def _log_fm_checkpoint(self, prompt_id: int) -> None:
        """The prompt's FM checkpoint and masks as a `model` artifact (logger.wandb.log_model)."""
        folder = self.out_dir / "fm" / f"prompt_{prompt_id}" if self.out_dir else None
        if not self.log_model or folder is None or not (folder / "fm.ckpt").exists():
            return
        artifact = wandb.Artifact(f"fm-{self.run.id}-prompt-{prompt_id}", type="model")
        for name in ("fm.ckpt", "masks.pt"):
            if (folder / name).exists():
                artifact.add_file(str(folder / name))
        self.run.log_artifact(artifact, aliases=["latest", f"prompt_{prompt_id}"])

    def _search_row(self, result: PromptResult, greedy: GreedyRecord) -> list:
        # greedy keeps a set only where ablating every candidate flipped the prompt
        minimal, verification, readout = greedy.minimal, result.verification, result.interactions
        return [
            result.prompt_id,
            result.instruction,
            greedy.clean_score,
            ", ".join(f"{c.feature} ({c.cos:.2f})" for c in greedy.candidates),
            len(greedy.candidates),
            " ".join(str(f) for f in minimal),
            " ".join(self.url(f) for f in minimal).strip(),
            len(minimal) if minimal else None,
            greedy.one_minimal_by_score,
            result.one_minimal,
            greedy.score,
            result.evals,
            result.seconds,
            result.baseline.reply,
            verification.reply_after if verification is not None else "",
            str(result.baseline.verdict),
            str(verification.verdict_after) if verification is not None else "",
            result.flip_verified,
            *(getattr(readout, key) if readout else None for key in FM_METRICS),
            readout.interactions_significant if readout else None,
            len(result.dormant_features),
            result.random_control.flip_rate if result.random_control else None,
            result.harmless_kl,
        ]

    @_guarded
    def feature_sets(self) -> None:
        """The run's findings as one `feature_sets` artifact: summary, results, direction,
        controls, and a table of the jailbroken prompts' minimal sets with their links."""
        artifact = wandb.Artifact(f"feature_sets-{self.run.id}", type="feature_sets")
        for name in FEATURE_SET_FILES:
            path = self.out_dir / name if self.out_dir else None
            if path is not None and path.exists():
                artifact.add_file(str(path))
        rows = [
            [pid, feature, self.url(Feature.parse(feature))]
            for pid, features in self.minimal_sets.items()
            for feature in features
        ]
        artifact.add(wandb.Table(["prompt_id", "feature", "neuronpedia"], rows), "minimal_sets")
        self.run.log_artifact(artifact, aliases=["latest"])

    def _dormant_row(self, prompt_id: int, d: DormantFeature) -> list:
        f = d.feature
        values = [d.before, d.after, d.score_without, d.score_with, d.effect, d.null_percentile]
        setting = " ".join(str(g) for g in d.setting)
        verdict = str(d.verdict_with) if d.verdict_with else ""
        return [prompt_id, str(f), f.layer, f.latent, *values, setting, verdict, self.url(f)]

    @_guarded
    def summary(self, summary: Summary) -> None:
        """Headline numbers for dashboards, plus per-prompt lists for `refusal.report --wandb`."""
        values = (
            {k: getattr(summary, k) for k in SUMMARY_KEYS}
            | {
                "minimal_set_size_mean": mean_or_none(summary.minimal_set_sizes),
                "fm_auc_mean": mean_or_none(summary.fm_heldout_auc),
                "harmless_kl_mean": mean_or_none(summary.harmless_kl),
                "minimal_sets": {str(k): v for k, v in self.minimal_sets.items()},
            }
            | {f"seconds/{part}": s for part, s in summary.stage_seconds.items()}
        )
        self.run.summary.update({k: v for k, v in values.items() if v is not None})

    def finish(self) -> None:
        """Close the W&B run and say where it is (and how to upload it when offline)."""
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            where = Path(run.dir).parent
            message = (
                f"W&B run (offline): {where}\n  upload it with: wandb sync {where}"
                if run.offline
                else f"W&B run: {run.url} (files in {where})"
            )
            run.finish()
        except Exception as error:  # its files are on disk whatever happened here
            _warn("finish", error)
            return
        console.print(message, soft_wrap=True, markup=False)  # paths stay whole, to copy


def prompt_scalars(result: PromptResult, greedy: GreedyRecord) -> dict[str, Any]:
    """A searched prompt's scalars (PROMPT_METRICS), None where not measured."""
    readout, control = result.interactions, result.random_control
    return {
        **{f"fm/{key}": getattr(readout, key) if readout else None for key in FM_METRICS},
        "prompt/minimal_set_size": len(greedy.minimal) if greedy.minimal else None,
        "prompt/jailbroken": int(result.flip_verified),
        "prompt/score_after": greedy.score,
        "prompt/n_dormant": len(result.dormant_features),
        "prompt/random_flip_rate": control.flip_rate if control else None,
        "prompt/harmless_kl": result.harmless_kl,
        "prompt/seconds": result.seconds,
    }


def sweep_keys(cfg: DictConfig, sae_width: int | None) -> dict[str, Any]:
    """Scalar config keys a sweep's runs are grouped and compared by in W&B panels."""
    layers = [int(layer) for layer in cfg.layers]
    return {
        "layers_str": "-".join(map(str, layers)),
        "layer": layers[0] if len(layers) == 1 else None,
        "n_layers": len(layers),
        "sae_width": sae_width,
        "intervention": str(cfg.search.intervention),
    }


def build(cfg: DictConfig, sae_width: int | None = None) -> Tracker:
    """The tracker conf/logger/ asks for: a W&B run (its files under the run directory),
    other Lightning loggers for the FM, or nothing (logger=none).

    `logger.wandb.log_model` is the tracker's to honour (FM checkpoints as model artifacts,
    offline too): Lightning's own would refuse an offline run.
    """
    logger_cfgs = [c for c in (cfg.get("logger") or {}).values() if "_target_" in c]
    wandb_cfg = next((c for c in logger_cfgs if _is_wandb(c)), None)
    others = [c for c in logger_cfgs if c is not wandb_cfg]
    if wandb_cfg is None:
        return Tracker(fm_logger_cfgs=others)
    try:
        identity = run_identity(cfg, wandb_cfg)
        logger = hydra.utils.instantiate(wandb_cfg, **identity, log_model=False)
        logger.log_hyperparams(flat_config(cfg) | sweep_keys(cfg, sae_width))  # starts the run
        run = logger.experiment
    except Exception as error:
        _warn("start", error)
        return Tracker(fm_logger_cfgs=others)
    return Tracker(
        run,
        others,
        neuronpedia_ids(cfg),
        out_dir=Path(cfg.paths.output_dir),
        fm_curves=bool(cfg.search.fm.get("log_curves", False)),
        log_model=bool(wandb_cfg.get("log_model", False)),
    )


def _is_wandb(logger_cfg: DictConfig) -> bool:
    return issubclass(hydra.utils.get_class(logger_cfg._target_), WandbLogger)


def neuronpedia_ids(cfg: DictConfig) -> dict[int, str | None]:
    try:
        return {int(layer): saes.neuronpedia_id(cfg.sae, int(layer)) for layer in cfg.layers}
    except Exception as error:  # links are a convenience: an unknown release only loses them
        log.warning("no Neuronpedia ids for sae=%s: %r", cfg.sae.get("release"), error)
        return {}


def finish_open_run() -> None:
    """Finish a W&B run an error left open (exit code 1), so the next job of a multirun
    in this process starts its own run instead of reusing it."""
    if wandb.run is not None:
        wandb.run.finish(exit_code=1)
