"""Hydra callbacks: refuse to start a run whose output directory cannot take results."""

from __future__ import annotations

import shutil
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from refusal.errors import RefusalError, exit_with


def check_writable(path: str | Path, min_free_mb: int = 50) -> None:
    """Raise RefusalError unless `path` can be created, written, and has free space."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-check"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RefusalError(
            f"cannot write results to {path}: {e.strerror}. "
            "Choose another directory with hydra.run.dir=... (or hydra.sweep.dir=... for -m)."
        ) from None
    free_mb = shutil.disk_usage(path).free / 2**20
    if free_mb < min_free_mb:
        raise RefusalError(
            f"only {free_mb:.0f} MB free under {path}: free some disk space or choose another "
            "hydra.run.dir=..."
        )


class OutputDirCheck(Callback):
    """Checks the run or sweep directory before Hydra creates it, with a one-line error."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _check_or_exit(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _check_or_exit(config.hydra.sweep.dir)


def _check_or_exit(path: str) -> None:
    try:
        check_writable(path)
    except RefusalError as error:
        exit_with(error)
