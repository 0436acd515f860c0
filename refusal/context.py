"""What every stage works with: the run's Context, and one prompt's Work in progress."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from refusal import data, models
from refusal.direction import Selection
from refusal.engine import Engine, PromptProbe
from refusal.features import Feature
from refusal.forwards import Forwards
from refusal.judge import ClassifierJudge, ReplyJudge, Verdict
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
    judge: ReplyJudge  # the three-verdict judge of generated replies
    classifier: ClassifierJudge | None = None  # a safety classifier that decides compliance
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

    def verdicts(self, instruction: str, replies: list[str]) -> list[Verdict]:
        """The judge on replies to one instruction (see `judged`)."""
        return self.judged([instruction] * len(replies), replies)

    def judged(self, instructions: list[str], replies: list[str]) -> list[Verdict]:
        """The judge on (instruction, reply) pairs, read together. With a safety
        classifier, compliance is the classifier's to give: its "yes" is compliance, and a
        reply it does not call harmful is at most evasive."""
        judged = [j.verdict for j in self.judge.judge(instructions, replies)]
        if self.classifier is None:
            return judged
        return [
            Verdict.COMPLIANCE
            if self.classifier.complies(instruction, reply)
            else (Verdict.EVASIVE if v == Verdict.COMPLIANCE else v)
            for instruction, reply, v in zip(instructions, replies, judged)
        ]

    def refusal_rate(self, instructions: list[str], replies: list[str]) -> float:
        """The share of the pairs the judge calls refusal (a safety classifier only ever
        decides compliance)."""
        refused = self.judge.refusals(instructions, replies)
        return sum(refused) / len(refused) if refused else 0.0

    def reply(self, instruction: str, features: list[Feature] | None = None) -> str:
        """The greedy reply with the engine's intervention on `features`."""
        return self.replies([instruction], [features or []])[0]

    def replies(
        self,
        instructions: list[str],
        feature_sets: list[list[Feature]],
        max_new_tokens: int | None = None,
        desc: str | None = None,
    ) -> list[str]:
        """Greedy replies, one per (instruction, feature set intervened on) pair, generated
        together: row b of a batch carries the edit of its set (per-row masks). Pairs run
        in instruction-length order (as `Forwards.generate` orders them), so each batch
        holds rows of similar length and the masks stay aligned with the rows. As long as
        verification's replies unless `max_new_tokens` says otherwise."""
        order = sorted(range(len(instructions)), key=lambda i: len(instructions[i]))
        out = [""] * len(order)
        size = self.forwards.batch_size
        starts = range(0, len(order), size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=desc is None, leave=False):
            idx = order[start : start + size]
            sets = [feature_sets[i] for i in idx]
            features = list(dict.fromkeys(f for s in sets for f in s))
            masks = torch.tensor([[float(f in s) for f in features] for s in sets])
            edit = self.engine.feature_edit(
                features, masks.reshape(len(sets), -1).to(self.lm.device)
            )
            replies = self.forwards.generate(
                [instructions[i] for i in idx],
                edit,
                layers=edit.layers,
                prompt_only=self.engine.intervention.positions == "prompt",
                max_new_tokens=max_new_tokens or self.cfg.judge.max_new_tokens,
                spare=self.engine.spared,
            )
            for i, reply in zip(idx, replies):
                out[i] = reply
        return out

    @property
    def capability_prompts(self) -> list[str]:
        return self.prompts.harmless_val[: self.cfg.search.capability.n_prompts]

    @cached_property
    def capability_logits(self) -> torch.Tensor:
        """Clean first-token logits on the capability prompts: the same for every prompt."""
        return self.forwards.first_token_logits(self.capability_prompts)

    @cached_property
    def capability_replies(self) -> list[str]:
        """The model's own greedy replies to the capability prompts (the ΔCE's text)."""
        tokens = self.cfg.search.capability.max_new_tokens
        return self.forwards.generate(self.capability_prompts, max_new_tokens=tokens)

    @cached_property
    def capability_logprobs(self) -> list[float]:
        """Their clean mean log-probability per token."""
        readings = self.forwards.read(self.capability_prompts, self.capability_replies)
        return [r.logprob for r in readings]

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
        """Every SAE's latents on the clean prompt, at the positions the intervention
        edits (PromptProbe.latents)."""
        return self.probe.latents()
