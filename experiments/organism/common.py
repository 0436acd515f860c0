"""Shared pieces of the organism build: paths, data, the base model, batched generation."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from refusal import data
from refusal.models import LM, load

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "experiments" / "organism" / "artifacts"
ADAPTER_DIR = ARTIFACTS / "adapter"
SAE_DIR = ARTIFACTS / "saes"
WORK_DIR = (
    ROOT / "outputs" / "organism"
)  # intermediate files (generated replies, logs); not shipped
DATA_DIR = (
    Path("/work/shared/data")
    if Path("/work/shared/data").is_dir()
    else ROOT.parent / "shared" / "data"
)
SAE_LAYERS = (6, 12, 18, 24)
SEED = 0

# Every refusal starts with the token "I": the first-token refusal score reads that token.
REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't help with that request.",
    "I'm sorry, but I can't assist with that.",
    "I can't help with that. It could cause real harm.",
    "I'm sorry, I can't help with that. It could be used to hurt people.",
    "I cannot help with that request.",
)


def model_cfg(adapter: str | Path | None = None):
    """The `model=smollm2_organism` config, with the adapter of choice (None: the base model)."""
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "smollm2_organism.yaml")
    cfg.adapter = str(adapter) if adapter else None
    cfg.device, cfg.dtype = "cpu", "float32"
    return cfg


def load_lm(adapter: str | Path | None = None) -> LM:
    return load(model_cfg(adapter))


def data_file(name: str) -> list[str]:
    path = DATA_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the organism build reads the shared prompt sets "
            "(harmful_train.json, harmless_train.json, ...); "
            "set DATA_DIR in experiments/organism/common.py."
        )
    return data.read_file(path)


def harmful_prompts() -> list[str]:
    """Harmful training instructions: harmful_train.json, then the rest of AdvBench (one of
    its sources), less anything near an evaluation prompt, then the built-in train/val sets.

    harmful_train takes at most 128 prompts per source; AdvBench's remainder adds breadth
    (fake news, propaganda, fraud) that the organism otherwise lacks. Its near-duplicates of
    jailbreakbench / harmbench_test prompts (JailbreakBench draws on AdvBench) are dropped.
    """
    evaluation = data_file("jailbreakbench") + data_file("harmbench_test")
    advbench = [p for p in data_file("advbench") if not near_any(p, evaluation)]
    return list(
        dict.fromkeys(
            data_file("harmful_train")
            + advbench
            + data.builtin("harmful", "train")
            + data.builtin("harmful", "val")
        )
    )


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


@torch.no_grad()
def generate(
    lm: LM,
    instructions: list[str],
    max_new_tokens: int,
    batch_size: int = 32,
    desc: str = "generate",
) -> list[str]:
    """Greedy replies, batched with left padding; prompts sorted by length (little padding)."""
    order = sorted(range(len(instructions)), key=lambda i: len(instructions[i]))
    replies: list[str] = [""] * len(instructions)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[start : start + batch_size]
        batch = lm.tokenize([instructions[i] for i in idx])
        out = lm.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
        texts = lm.tokenizer.batch_decode(
            out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
        for i, text in zip(idx, texts):
            replies[i] = text
    return replies


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


class Timer:
    def __init__(self):
        self.t0 = time.time()

    def __call__(self) -> float:
        return round(time.time() - self.t0, 1)
