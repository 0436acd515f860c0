"""A per-prompt stage: its name, the stages whose rows it reads, when it applies, and run
(on one prompt, or on several together where batching across prompts pays)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    # the same on several prompts at once, one record each in order: for stages that
    # generate, where one row's decode costs nearly what a batch's does
    together: Callable[[Context, list[Work]], Sequence[Record]] | None = None

    def batches(self, works: list[Work]) -> list[list[Work]]:
        """The prompts `run_all` takes at a time: all together, or one by one."""
        return [works] if self.together is not None else [[work] for work in works]

    def run_all(self, ctx: Context, works: list[Work]) -> Sequence[Record]:
        if self.together is not None:
            return self.together(ctx, works)
        return [self.run(ctx, work) for work in works]
