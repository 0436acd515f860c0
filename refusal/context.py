"""What every stage works with: the run's Context, and one prompt's Work in progress."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

import torch
from omegaconf import DictConfig

from refusal import data, judge, models
from refusal.direction import Selection
from refusal.engine import Engine, PromptProbe
from refusal.features import Feature
from refusal.forwards import Forwards
from refusal.records import RESULTS, PromptResult, Record, Row, parse_row
from refusal.rundir import RunDir
from refusal.tracking import Tracker

R = TypeVar("R", bound=Row)


@dataclass
class Context:
    """The config, model, engine, forwards, prompts and run directory of one run."""

    cfg: DictConfig
    lm: models.LM
    engine: Engine
    forwards: Forwards
    prompts: data.Prompts
    out: RunDir
    tracker: Tracker
    classifier: judge.ClassifierJudge | None = None
    selection: Selection | None = None  # set by the direction stage
    directions: torch.Tensor | None = None  # (n_layers, n_positions, d), likewise

    @property
    def threshold(self) -> float:
        return self.cfg.judge.threshold

    @property
    def flip_threshold(self) -> float:
        """Scores below this count as compliance in the search: a margin under the refusal
        threshold, so that greedy generation confirms the flip rather than teeter on it."""
        return self.cfg.judge.threshold - self.cfg.judge.flip_margin

    @property
    def markers(self) -> list[str] | tuple[str, ...]:
        return self.cfg.judge.markers or judge.REFUSAL_MARKERS

    def refuses(self, instruction: str, score: float, reply: str) -> bool:
        return score > self.threshold and self.is_refusal(instruction, reply)

    def is_refusal(self, instruction: str, reply: str) -> bool:
        """The generation judge: a safety classifier where configured, else refusal markers."""
        if self.classifier is not None:
            return not self.classifier.complies(instruction, reply)
        return judge.is_refusal(reply, self.markers)

    def reply(self, instruction: str, features: list[Feature] | None = None) -> str:
        """The greedy reply with the engine's intervention on `features`."""
        edit = self.engine.feature_edit(features or [])
        return self.forwards.generate(
            [instruction],
            edit,
            layers=edit.layers,
            prompt_only=self.engine.intervention.positions == "prompt",
            max_new_tokens=self.cfg.judge.max_new_tokens,
            spare=self.engine.spared,
        )[0]

    @property
    def capability_prompts(self) -> list[str]:
        return self.prompts.harmless_val[: self.cfg.search.capability.n_prompts]

    @cached_property
    def capability_logits(self) -> torch.Tensor:
        """Clean first-token logits on the capability prompts: the same for every prompt."""
        return self.forwards.first_token_logits(self.capability_prompts)

    def written(self) -> list[Record]:
        """Every row already in results.jsonl (all of them on resume)."""
        return [parse_row(row) for row in self.out.read(RESULTS)]

    def record(self, row: R) -> R:
        """Append a row to results.jsonl; the row itself back."""
        self.out.append(RESULTS, row.to_json())
        return row


@dataclass
class Work:
    """One prompt under search: its rows so far, and the engine bound to it (on demand)."""

    ctx: Context
    result: PromptResult

    @property
    def instruction(self) -> str:
        return self.result.instruction

    @cached_property
    def probe(self) -> PromptProbe:
        return PromptProbe(self.ctx.engine, self.ctx.engine.prepare(self.instruction))

    @cached_property
    def clean(self) -> dict[int, torch.Tensor]:
        """Every SAE's latents (T, d_sae) on the clean prompt."""
        return self.probe.latents()
