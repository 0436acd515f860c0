"""Results as data: append-only JSON lines and atomic JSON files in the run directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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

    def append(self, name: str, record: dict) -> None:
        """Append one JSON line and fsync it, so a killed run loses at most this line."""
        with (self.path / name).open("a", encoding="utf-8") as f:
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
        target = self.path / name
        tmp = target.with_suffix(target.suffix + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write(json.dumps(value, default=_json_default, indent=2, ensure_ascii=False))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        return target
