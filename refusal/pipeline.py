"""The stages of a run, in order: baseline → direction → greedy → interactions → dormant.

Each stage appends its results to the run directory as it goes (`results.jsonl`, one
line per prompt per stage); a resumed run skips every (stage, prompt) already there.
"""

from __future__ import annotations

import platform
import shutil
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from importlib.metadata import version
from statistics import median

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from refusal import data, direction, dormant, fm, greedy, judge, models, report, saes, tracking
from refusal.engine import Ablation, Engine, Feature, PromptProbe
from refusal.errors import ConfigError
from refusal.tracking import RunDir, Tracker

console = Console(stderr=True)
RESULTS = "results.jsonl"


@dataclass
class Run:
    """Everything a stage needs: the config, model, engine, prompts and run directory."""

    cfg: DictConfig
    lm: models.LM
    engine: Engine
    prompts: data.Prompts
    out: RunDir
    tracker: Tracker
    classifier: judge.ClassifierJudge | None = None

    @property
    def threshold(self) -> float:
        return self.cfg.judge.threshold

    @property
    def flip_threshold(self) -> float:
        """Scores below this count as compliance in the search: a margin under the refusal
        threshold, so that greedy generation confirms the flip rather than teeter on it."""
        return self.cfg.judge.threshold - self.cfg.judge.flip_margin

    def refuses(self, instruction: str, score: float, reply: str) -> bool:
        return score > self.threshold and self.is_refusal(instruction, reply)

    def is_refusal(self, instruction: str, reply: str) -> bool:
        """The generation judge: a safety classifier where configured, else refusal markers."""
        if self.classifier is not None:
            return not self.classifier.complies(instruction, reply)
        return judge.is_refusal(reply, markers(self.cfg))

    def reply(self, instruction: str, features: list[Feature] | None = None) -> str:
        return self.engine.generate([instruction], features, self.cfg.judge.max_new_tokens)[0]

    @property
    def capability_prompts(self) -> list[str]:
        return self.prompts.harmless_val[: self.cfg.search.capability.n_prompts]

    @cached_property
    def capability_logits(self) -> torch.Tensor:
        """Clean first-token logits on the capability prompts: the same for every prompt."""
        return self.engine.first_token_logits(self.capability_prompts)

    def done(self, stage: str) -> dict[int, dict]:
        """Rows already written for a stage, by prompt id (all of them on resume)."""
        return {r["prompt_id"]: r for r in self.out.read(RESULTS) if r.get("stage") == stage}

    def record(self, row: dict) -> dict:
        self.out.append(RESULTS, row)
        return row


CHOICES = {
    "search.ablation.mode": ("zero", "scale"),
    "search.ablation.positions": ("prompt", "all"),
    "search.fm.target": ("bce", "mse"),
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


def resuming(cfg: DictConfig) -> bool:
    """resume=true, or a re-launched multirun job whose directory already holds results."""
    if cfg.resume:
        return True
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    return hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN


def markers(cfg: DictConfig) -> list[str] | tuple[str, ...]:
    return cfg.judge.markers or judge.REFUSAL_MARKERS


def setup(cfg: DictConfig) -> Run:
    torch.manual_seed(cfg.seed)
    validate(cfg)
    prompts = data.load(cfg.data)  # cheap checks first: a bad prompt file fails before loading
    with console.status(f"loading {cfg.model.name} and {len(cfg.layers)} SAE(s)"):
        lm = models.load(cfg.model, seed=cfg.seed)
        sae_by_layer = saes.load(cfg.sae, lm, list(cfg.layers), seed=cfg.seed)
    auto_batch = cfg.search.batch_size == "auto"
    engine = Engine(
        lm,
        sae_by_layer,
        judge.refusal_token_ids(lm.tokenizer, list(cfg.judge.refusal_tokens)),
        Ablation(**cfg.search.ablation),
        # "auto": 64 for the batched full forwards until the first masks scored tune it
        batch_size=64 if auto_batch else cfg.search.batch_size,
        compile=cfg.search.compile,
        openings=judge.refusal_openings(lm, markers(cfg)),
        tune=auto_batch,
    )
    out = RunDir(cfg.paths.output_dir)
    if not resuming(cfg) and out.read(RESULTS):
        out.path.joinpath(RESULTS).rename(out.path / f"results.{int(time.time())}.jsonl")
    return Run(cfg, lm, engine, prompts, out, tracking.build(cfg), load_classifier(cfg.judge))


def load_classifier(cfg: DictConfig) -> judge.ClassifierJudge | None:
    """The safety classifier of `judge=harmbench` / `judge=llamaguard`, else None."""
    if cfg.kind != "classifier":
        return None
    with console.status(f"loading the classifier judge {cfg.classifier.name}"):
        return judge.ClassifierJudge(models.load(cfg.classifier), cfg.classifier.format)


def baseline(run: Run) -> list[dict]:
    """Judge every evaluation prompt; only those the model refuses go on."""
    done = run.done("baseline")
    rows = []
    for i, instruction in enumerate(tqdm(run.prompts.eval, desc="baseline", unit="prompt")):
        if i in done:
            rows.append(done[i])
            continue
        score = run.engine.prepare(instruction).score
        reply = run.reply(instruction)
        rows.append(
            run.record(
                {
                    "stage": "baseline",
                    "prompt_id": i,
                    "instruction": instruction,
                    "score": score,
                    "reply": reply,
                    "refused": run.refuses(instruction, score, reply),
                }
            )
        )
    return rows


def refusal_direction(run: Run) -> tuple[torch.Tensor, direction.Selection]:
    """Difference-of-means directions for every layer, and the selected (layer, position)."""
    path = run.out.path / "direction.pt"
    if path.exists():
        saved = torch.load(path)
        return saved["directions"], direction.Selection(**saved["selection"])
    cfg, p = run.cfg.search.direction, run.prompts
    with console.status("refusal direction: difference of means"):
        directions = direction.mean_diff(run.engine, p.harmful_train, p.harmless_train)
    selection = direction.select(
        run.engine,
        directions,
        p.harmful_val,
        p.harmless_val,
        cfg.exclude_last_fraction,
        cfg.kl_max,
        cfg.induce_min,
        cfg.n_positions,
    )
    saved = {"directions": directions, "selection": asdict(selection)}
    run.out.write_atomic(path.name, lambda f: torch.save(saved, f))
    run.out.write_json(
        "direction.json", {k: v for k, v in asdict(selection).items() if k != "direction"}
    )
    return directions, selection


def search_prompt(run: Run, row: dict, directions: torch.Tensor, position: int) -> dict:
    """Candidates → greedy minimal set → verification → FM interactions → dormant → KL."""
    cfg = run.cfg.search
    instruction = row["instruction"]
    probe = PromptProbe(run.engine, run.engine.prepare(instruction))
    evals_before, started = run.engine.evals, time.time()
    clean = probe.latents()
    found = direction.candidates(
        run.engine,
        directions,
        position,
        clean,
        cfg.candidates.top_k,
        cfg.candidates.cos_floor,
        cfg.candidates.min_activation,
    )
    features = [f for f, _ in found]
    result = {
        "stage": "search",
        "prompt_id": row["prompt_id"],
        "instruction": instruction,
        "clean_score": probe.cache.score,
        "candidates": [{"feature": str(f), "cos": c} for f, c in found],
    }
    minimal = greedy.minimal_set(probe, features, run.flip_threshold) if features else None
    result["greedy"] = (
        None
        if minimal is None
        else {
            "flips_all": minimal.flips_all,
            "minimal": [str(f) for f in minimal.minimal],
            "size": len(minimal.minimal),
            "score": minimal.score,
            "evals": minimal.evals,
            "batches": minimal.batches,
            "one_minimal": minimal.one_minimal,
        }
    )
    if minimal and minimal.flips_all:
        reply = run.reply(instruction, minimal.minimal)
        result.update(reply_after=reply, flip_verified=not run.is_refusal(instruction, reply))
        result["interactions"] = interactions(
            run, probe, row["prompt_id"], minimal.minimal, clean, found
        )
        result["dormant"] = [
            d.to_dict()
            for d in dormant.find(
                probe,
                minimal.minimal,
                list(run.engine.saes),
                cfg.dormant.min_activation,
                cfg.dormant.max_candidates,
                cfg.dormant.margin,
                clean,
            )
        ]
        result["harmless_kl"] = harmless_kl(run, minimal.minimal)
    else:
        result["flip_verified"] = False
    result["evals"] = run.engine.evals - evals_before
    result["seconds"] = time.time() - started
    return run.record(result)


def interactions(
    run: Run,
    probe: PromptProbe,
    prompt_id: int,
    minimal: list[Feature],
    clean: dict,
    found: list[tuple[Feature, float]],
) -> dict:
    """FM over M plus other features active on the prompt (candidates first, then strongest)."""
    cfg = run.cfg.search.fm
    extra = fm.extra_features(minimal, [f for f, _ in found], clean, cfg.max_extra)
    features = minimal + extra
    masks = fm.sample_masks(
        cfg.n_masks,
        len(minimal),
        len(extra),
        cfg.p_minimal,
        cfg.p_extra,
        seed=run.cfg.seed + prompt_id,
    )
    scores = probe.score(features, masks)
    out_dir = run.out.path / "fm" / f"prompt_{prompt_id}"
    shutil.rmtree(out_dir, ignore_errors=True)  # left by a killed run: train afresh
    readout = fm.fit(
        masks,
        scores,
        run.flip_threshold,
        features,
        cfg,
        run.cfg.trainer,
        out_dir,
        logger=run.tracker.fm_loggers(prompt_id),
        seed=run.cfg.seed,
    )
    # the FM's data, to refit or study it without scoring the masks again
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"features": [str(f) for f in features], "masks": masks, "scores": scores},
        out_dir / "masks.pt",
    )
    return {
        "features": [str(f) for f in features],
        "n_masks": len(masks),
        "flip_fraction": (scores < run.flip_threshold).float().mean().item(),
        **asdict(readout),
    }


def harmless_kl(run: Run, features: list[Feature]) -> float:
    """Capability cost: mean first-token KL on harmless val prompts with the set ablated."""
    edit = run.engine.feature_edit(features)
    ablated = run.engine.first_token_logits(run.capability_prompts, edit)
    return direction.first_token_kl(run.capability_logits, ablated).mean().item()


def summarize(run: Run, rows: list[dict], searched: list[dict], selection, started: float) -> dict:
    flipped = [s for s in searched if s.get("flip_verified")]
    n_refused = sum(r["refused"] for r in rows)
    evals = sum(s["evals"] for s in searched)
    seconds = sum(s["seconds"] for s in searched)
    return {
        "n_eval": len(rows),
        "n_refused": n_refused,
        "n_flipped_verified": len(flipped),
        "flip_rate": len(flipped) / n_refused if n_refused else None,
        "minimal_set_sizes": [s["greedy"]["size"] for s in flipped],
        "all_minimal_verified": all(s["greedy"]["one_minimal"] for s in flipped),
        "fm_heldout_auc": [s["interactions"]["heldout_auc"] for s in flipped],
        "harmless_kl": [s["harmless_kl"] for s in flipped],
        "n_dormant": sum(len(s["dormant"]) for s in flipped),
        "direction": None
        if selection is None
        else {"layer": selection.layer, "position": selection.position},
        "evals_per_s": evals / seconds if seconds else None,
        "batch_size": run.engine.batch_size,  # as tuned, or halved on out-of-memory
        "seconds_per_prompt": [s["seconds"] for s in searched],
        "median_seconds_per_prompt": median(s["seconds"] for s in searched) if searched else None,
        "wall_seconds": time.time() - started,
        "seed": run.cfg.seed,
        "versions": {
            p: version(p) for p in ("torch", "transformers", "sae-lens", "lightning", "refusal")
        }
        | {"python": platform.python_version()},
        "config": OmegaConf.to_container(
            OmegaConf.masked_copy(run.cfg, [k for k in run.cfg if k != "hydra"]), resolve=True
        ),
    }


def print_table(rows: list[dict], searched: dict[int, dict]) -> None:
    table = Table(title="refusal search, per prompt")
    for column in (
        "id",
        "refused",
        "score",
        "|M|",
        "flip",
        "FM AUC",
        "dormant",
        "KL",
        "s",
        "instruction",
    ):
        wide = column == "instruction"
        table.add_column(column, no_wrap=True, overflow="ellipsis", max_width=48 if wide else None)
    for r in rows:
        s = searched.get(r["prompt_id"], {})
        g = s.get("greedy") or {}
        auc = (s.get("interactions") or {}).get("heldout_auc")
        table.add_row(
            str(r["prompt_id"]),
            "yes" if r["refused"] else "no",
            f"{r['score']:.2f}",
            str(g.get("size", "")) if s.get("flip_verified") else "",
            "yes" if s.get("flip_verified") else "",
            "" if auc is None else f"{auc:.2f}",
            str(len(s["dormant"])) if "dormant" in s else "",
            f"{s['harmless_kl']:.2f}" if "harmless_kl" in s else "",
            f"{s['seconds']:.0f}" if "seconds" in s else "",
            r["instruction"][:50],
        )
    Console(width=max(console.width, 120)).print(table)  # one line per prompt, even in logs


def run(cfg: DictConfig) -> float | None:
    """Run every stage; print the per-prompt table; return the optimised summary metric."""
    started = time.time()
    state = setup(cfg)
    rows = baseline(state)
    state.tracker.baseline(rows)
    refused = [r for r in rows if r["refused"]]
    searched, selection = {}, None
    if not refused:
        console.print("[yellow]no evaluation prompt was refused at baseline: nothing to search.[/]")
    elif "direction" in cfg.search.stages:
        directions, selection = refusal_direction(state)
        state.tracker.direction(selection)
        done = state.done("search")
        for row in tqdm(refused, desc="search", unit="prompt"):
            searched[row["prompt_id"]] = done.get(row["prompt_id"]) or search_prompt(
                state, row, directions, selection.position
            )
            state.tracker.prompt(searched[row["prompt_id"]])
    summary = summarize(state, rows, list(searched.values()), selection, started)
    state.out.write_json("summary.json", summary)
    state.tracker.summary(summary)
    print_table(rows, searched)
    console.print(
        f"refused {summary['n_refused']}/{summary['n_eval']}; "
        f"verified flips {summary['n_flipped_verified']}; "
        f"minimal set sizes {summary['minimal_set_sizes']}; dormant {summary['n_dormant']}; "
        f"median search {summary['median_seconds_per_prompt'] or 0:.0f} s/prompt. "
        f"Results in {state.out.path}"
    )
    console.print(f"Report: {report.write_quietly(state.out.path)}", soft_wrap=True, markup=False)
    state.tracker.finish()
    return summary.get(cfg.optimized_metric)
