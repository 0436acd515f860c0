"""The run directory, the source of truth for a run's results: append-only JSON lines
(fsynced line by line, a torn last line dropped) and atomic whole-file writes."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from refusal.errors import ConfigError, RefusalError

SETTINGS = "settings.json"
# what a launch finds already written for it: Hydra's record of this launch and its log,
# W&B's per-run folders, and the previous runs moved aside
KEPT = (".hydra", "wandb")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__dict__"):
        return vars(value)
    return str(value)


def dumps(record: Any) -> str:
    return json.dumps(record, default=_json_default, ensure_ascii=False)


class RunDir:
    """The run directory: the source of truth for a run's results."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def claim(self, settings: dict[str, Any], resume: bool) -> None:
        """Make the directory this run's, so that nothing another config made is read back.

        Resuming, the run that wrote the directory must have had the same `settings` (a
        flat {key: value} of everything that decides results): a change stops the run and
        names the keys. Otherwise what earlier runs left (results, direction.pt,
        controls.json, reports, FM data) moves into previous-<time>/.
        """
        path = self.path / SETTINGS
        if resume and path.exists():
            if changes := changed(json.loads(path.read_text(encoding="utf-8")), settings):
                raise ConfigError(
                    f"resume=true into {self.path}, whose run had other settings:\n  "
                    + "\n  ".join(changes)
                    + "\nrerun with the same settings, or without resume=true (the earlier "
                    "run's files are then moved aside into previous-<time>/)."
                )
        elif not resume:
            self._move_aside()
        self.write_json(SETTINGS, settings)

    def _move_aside(self) -> None:
        stale = [
            p
            for p in self.path.iterdir()
            if p.name not in KEPT and p.suffix != ".log" and not p.name.startswith("previous-")
        ]
        if stale:
            aside = self.path / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.mkdir(exist_ok=True)
            for p in stale:
                p.rename(aside / p.name)

    def append(self, name: str, record: dict) -> None:
        """Append one JSON line and fsync it, so a killed run loses at most this line."""
        path = self.path / name
        with self._writing(path):
            _drop_torn_tail(path)
            with path.open("a", encoding="utf-8") as f:
                f.write(dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def read(self, name: str) -> list[dict]:
        """All complete JSON lines of a file; a torn last line (killed mid-write) is skipped."""
        path = self.path / name
        if not path.exists():
            return []
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def write_json(self, name: str, value: Any) -> Path:
        """Write a whole JSON file atomically (write, fsync, rename)."""
        text = json.dumps(value, default=_json_default, indent=2, ensure_ascii=False)
        return self.write_atomic(name, lambda f: f.write(text.encode("utf-8")))

    def write_atomic(self, name: str, write: Callable[[BinaryIO], Any]) -> Path:
        """Write a file through `write(f)` to a temporary name, fsync, then rename it over
        the target, so a reader sees the old file or the new one, never half of one."""
        target = self.path / name
        tmp = target.with_suffix(target.suffix + ".tmp")
        with self._writing(target):
            with tmp.open("wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        return target

    @contextmanager
    def _writing(self, path: Path) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise RefusalError(
                f"cannot write {path}: {e.strerror}. What was written before stays in {self.path}; "
                "free disk space, then rerun with resume=true on the same directory."
            ) from None


def changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """ "key: old -> new" for every key whose value differs (absent on one side: <unset>)."""
    keys = sorted(set(old) | set(new))
    unset = "<unset>"
    return [
        f"{k}: {old.get(k, unset)} -> {new.get(k, unset)}"
        for k in keys
        if old.get(k, unset) != new.get(k, unset)
    ]


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line left unfinished by a killed writer, so the next line starts clean."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)
