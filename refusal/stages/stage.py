"""A per-prompt stage: its name, the stages whose rows it reads, when it applies, and run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from refusal.context import Context, Work
from refusal.records import PromptResult, Record


def always(result: PromptResult) -> bool:
    return True


def flipped(result: PromptResult) -> bool:
    """Greedy filtering found a set whose ablation flips the prompt's score."""
    return result.flips_all


def jailbroken(result: PromptResult) -> bool:
    """Verification judged the reply with M ablated compliance."""
    return result.flip_verified


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]  # stages whose rows this one reads
    run: Callable[[Context, Work], Record]  # one of the per-prompt records, never a baseline
    applies: Callable[[PromptResult], bool] = always  # whether a prompt gets this stage
