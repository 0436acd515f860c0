"""Prompt sets: built-in, local JSON / JSONL / CSV files, or hub datasets.

A source is one string:
- `builtin:harmful/train` — a set shipped in the package (`harmful`|`harmless`,
  split `train`|`val`|`eval`|`all`);
- a local file path — a JSON list (of strings or of objects with an `instruction`,
  `prompt`, `goal` or `behavior` field, as in refusal_direction's files), JSONL, or CSV;
- a hub dataset id such as `walledai/AdvBench` (needs the hub; see HUB_DATASETS).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig

from refusal.errors import DataError
from refusal.hub import require_hub

TEXT_FIELDS = ("instruction", "prompt", "goal", "Goal", "behavior", "Behavior")
SPLITS = ("train", "val", "eval", "all")

# Hub datasets we know the layout of: id -> (config name, split, text column).
HUB_DATASETS = {
    "walledai/AdvBench": (None, "train", "prompt"),
    "JailbreakBench/JBB-Behaviors": ("behaviors", "harmful", "Goal"),
    "walledai/HarmBench": ("standard", "train", "prompt"),
    "tatsu-lab/alpaca": (None, "train", "instruction"),
}


@dataclass
class Prompts:
    """The prompt sets of one run. `eval_ids` are the evaluation prompts' ids (positions
    in the whole evaluation set, so a shard's ids are those of the unsharded run)."""

    harmful_train: list[str]
    harmless_train: list[str]
    harmful_val: list[str]
    harmless_val: list[str]
    eval: list[str]
    eval_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.eval_ids = self.eval_ids or list(range(len(self.eval)))


def shard(n_prompts: int, spec: str | None) -> list[int]:
    """The prompt ids of shard "i/n" (every n-th prompt from the i-th; all without one),
    so that the shards of a multirun split the evaluation set evenly and exactly."""
    if spec is None:
        return list(range(n_prompts))
    i, _, n = str(spec).partition("/")
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        raise DataError(
            f"data.shard={spec} is not i/n with 0 <= i < n: e.g. data.shard=0/4 "
            "(a multirun over shards: -m 'data.shard=0/4,1/4,2/4,3/4')."
        )
    return list(range(int(i), n_prompts, int(n)))


def builtin(name: str, split: str = "all") -> list[str]:
    """A built-in set: `harmful` or `harmless`, one split or all."""
    if split not in SPLITS:
        raise DataError(f"built-in split '{split}' is not one of {SPLITS}.")
    path = resources.files("refusal") / "prompts" / f"{name}.json"
    if not path.is_file():
        raise DataError(
            f"no built-in prompt set '{name}': choose builtin:harmful/... or builtin:harmless/..."
        )
    rows = json.loads(path.read_text())
    return [r["instruction"] for r in rows if split == "all" or r["split"] == split]


def _text(row: object, where: str) -> str:
    if isinstance(row, str):
        text = row
    elif isinstance(row, dict):
        field = next((f for f in TEXT_FIELDS if f in row), None)
        if field is None:
            raise DataError(
                f"{where}: no prompt field; expected one of {list(TEXT_FIELDS)}, got {list(row)}."
            )
        text = row[field]
    else:
        raise DataError(
            f"{where}: a prompt must be a string or an object, got {type(row).__name__}."
        )
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: the prompt is empty or not text ({text!r}).")
    return text


def _read_json(path: Path) -> list[str]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}).") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of prompts, got a {type(rows).__name__}.")
    return [_text(row, f"{path}, item {i}") for i, row in enumerate(rows)]


def _read_jsonl(path: Path) -> list[str]:
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: not valid JSON ({e.msg}).") from None
        prompts.append(_text(row, f"{path}, line {n}"))
    return prompts


def _read_csv(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            return []
        if not any(field in reader.fieldnames for field in TEXT_FIELDS):
            raise DataError(
                f"{path}, line 1: no prompt column; expected one of {list(TEXT_FIELDS)}."
            )
        return [_text(row, f"{path}, line {n}") for n, row in enumerate(reader, start=2)]


READERS = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv}


def read_file(path: str | Path) -> list[str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist.")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown prompt file type; use one of {list(READERS)}.")
    try:
        prompts = reader(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}).") from None
    if not prompts:
        raise DataError(f"{path} holds no prompts.")
    return prompts


def from_hub(dataset_id: str) -> list[str]:
    """A hub dataset's prompts; the hub must be reachable (or the dataset cached)."""
    config, split, column = HUB_DATASETS.get(dataset_id, (None, "train", None))
    require_hub(
        f"the dataset '{dataset_id}'",
        'Save its prompts as a JSON list of {"instruction": ...} and pass the file path instead.',
    )
    import datasets

    rows = datasets.load_dataset(dataset_id, config, split=split)
    column = column or next((c for c in TEXT_FIELDS if c in rows.column_names), None)
    if column is None:
        raise DataError(f"dataset '{dataset_id}' has no prompt column among {rows.column_names}.")
    if dataset_id == "tatsu-lab/alpaca":  # instructions that stand alone, as refusal_direction uses
        rows = rows.filter(lambda r: not r["input"].strip())
    return list(rows[column])


def load_source(source: str) -> list[str]:
    """The prompts of one source string (see the module docstring)."""
    source = str(source)
    if source.startswith("builtin:"):
        name, _, split = source.removeprefix("builtin:").partition("/")
        return builtin(name, split or "all")
    path = Path(source).expanduser()
    if path.suffix.lower() in READERS or path.exists() or source.startswith(("/", ".", "~")):
        return read_file(path)
    return from_hub(source)


def load(cfg: DictConfig) -> Prompts:
    """The five prompt sets a `data=` config names, capped at n_train / n_val / max_eval,
    the evaluation set cut to its shard (`data.shard`)."""

    def capped(source: str, n: int | None) -> list[str]:
        prompts = load_source(source)
        return prompts[:n] if n is not None else prompts

    evaluation = capped(cfg.eval, cfg.get("max_eval"))
    ids = shard(len(evaluation), cfg.get("shard"))
    return Prompts(
        harmful_train=capped(cfg.harmful_train, cfg.get("n_train")),
        harmless_train=capped(cfg.harmless_train, cfg.get("n_train")),
        harmful_val=capped(cfg.harmful_val, cfg.get("n_val")),
        harmless_val=capped(cfg.harmless_val, cfg.get("n_val")),
        eval=[evaluation[i] for i in ids],
        eval_ids=ids,
    )
