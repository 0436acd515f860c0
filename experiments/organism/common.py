"""Shared pieces of the organism build: its config, the shared prompt files, the refusals."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

from omegaconf import DictConfig

import refusal
from refusal import data
from refusal.errors import ConfigError, DataError
from refusal.forwards import Forwards
from refusal.judge import refusal_token_ids
from refusal.models import LM

# The organism's Hydra configs (conf/organism.yaml, conf/organism_eval.yaml) live here.
CONF = str(refusal.PROJECT_ROOT / "conf")

# Every refusal starts with the token "I": the first-token refusal score reads that token.
REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't help with that request.",
    "I'm sorry, but I can't assist with that.",
    "I can't help with that. It could cause real harm.",
    "I'm sorry, I can't help with that. It could be used to hurt people.",
    "I cannot help with that request.",
)


class PromptFiles:
    """The shared prompt files (harmful_train.json, harmless_train.json, ...) in the folder
    the config key `paths.data_dir` names."""

    def __init__(self, cfg: DictConfig):
        self.dir = Path(cfg.paths.data_dir)
        if not self.dir.is_dir():
            raise ConfigError(
                f"paths.data_dir={self.dir} is not a folder: the organism reads the shared "
                "prompt files (harmful_train.json, harmless_train.json, ...) from it; set "
                "paths.data_dir=<folder> on the command line or in conf/paths/default.yaml."
            )

    def read(self, name: str) -> list[str]:
        path = self.dir / f"{name}.json"
        if not path.is_file():
            raise DataError(
                f"{path} is missing: the organism reads {name}.json from paths.data_dir."
            )
        return data.read_file(path)

    def harmful(self) -> list[str]:
        """Harmful training instructions: harmful_train.json, then the rest of AdvBench (one
        of its sources), less anything near an evaluation prompt, then the built-in
        train/val sets.

        harmful_train takes at most 128 prompts per source; AdvBench's remainder adds breadth
        (fake news, propaganda, fraud) that the organism otherwise lacks. Its near-duplicates
        of jailbreakbench / harmbench_test prompts (JailbreakBench draws on AdvBench) are
        dropped.
        """
        evaluation = self.read("jailbreakbench") + self.read("harmbench_test")
        advbench = [p for p in self.read("advbench") if not near_any(p, evaluation)]
        return list(
            dict.fromkeys(
                self.read("harmful_train")
                + advbench
                + data.builtin("harmful", "train")
                + data.builtin("harmful", "val")
            )
        )


def forwards(lm: LM, cfg: DictConfig, batch_size: int = 32) -> Forwards:
    """Batched passes and generation over many prompts, the refusal score read from the
    model's refusal tokens."""
    return Forwards(lm, refusal_token_ids(lm.tokenizer, list(cfg.model.refusal_tokens)), batch_size)


def replies_path(cfg: DictConfig) -> Path:
    """Where finetune.py caches the base model's replies (prompt -> [max_new_tokens, reply]);
    the SAE corpus reads them too."""
    return Path(cfg.work_dir) / "base_replies.json"


# words every instruction shares ("Write a tutorial on how to ..."): not content
STOPWORDS = frozenset(
    {
        *("a", "an", "the", "to", "of", "and", "or", "for", "that", "on", "in", "with"),
        *("by", "can", "be", "is", "your", "their", "someone", "how", "step", "detailed"),
        *("write", "create", "provide", "give", "instructions", "guide", "tutorial"),
        *("develop", "explain", "describe"),
    }
)


def content_words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z]+", text.lower())) - STOPWORDS


def near_any(prompt: str, others: list[str], max_overlap: float = 0.3) -> bool:
    """Whether `prompt` shares at least `max_overlap` of its content words (Jaccard) with
    any of `others`: a conservative test for a reworded duplicate."""
    words = content_words(prompt)
    return any(
        len(words & other) / max(1, len(words | other)) >= max_overlap
        for other in map(content_words, others)
    )


def sample(items: list[str], n: int, seed: int) -> list[str]:
    items = list(dict.fromkeys(items))
    return random.Random(seed).sample(items, min(n, len(items)))


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


class Timer:
    def __init__(self):
        self.t0 = time.time()

    def __call__(self) -> float:
        return round(time.time() - self.t0, 1)
