"""Run directories: never overwritten, checkpoints written atomically, JSONL logs that survive kills.

A run directory holds ``config.yaml`` (the resolved config), ``train.log``, ``metrics.jsonl`` (one
object per evaluation), ``losses.jsonl`` (one per log interval), ``factors.jsonl`` (A*hs(theta)
per regularized tensor, one line per epoch), ``checkpoint.pt`` (latest), ``best.pt`` (best test
mAP, the seed's model selection) and ``plots/``.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
CONFIG = "config.yaml"


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked (exists already, or has nothing to resume)."""


def prepare_run_dir(path: str | Path, resume: bool = False, create: bool = True) -> Path:
    """Create a fresh run directory (``create``), or check that ``path`` holds a run to resume.

    An existing non-empty directory is never reused for a new run: that would overwrite someone's
    results. The seed deletes its output folder at start; this does not.
    """
    run = Path(path)
    if resume:
        if not (run / CHECKPOINT).is_file():
            raise RunDirError(f"cannot resume {run}: it has no {CHECKPOINT} (was the run started there?)")
        return run
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise RunDirError(
            f"run directory {run} already exists and is not empty; nothing was changed in it. "
            f"Resume it with --resume {run}, or choose another --out."
        )
    if create:
        run.mkdir(parents=True, exist_ok=True)
    return run


def _atomic_write(path: Path, write) -> None:
    """Call ``write(fh)`` on a temporary file beside ``path``, fsync, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_write(Path(path), lambda fh: fh.write(data))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    _atomic_write(Path(path), lambda fh: torch.save(state, fh))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        for name in (BEST, CHECKPOINT):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise RunDirError(f"{path} holds neither {BEST} nor {CHECKPOINT}")
    if not path.is_file():
        raise RunDirError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise RunDirError(f"checkpoint {path} cannot be read ({exc.__class__.__name__}: {exc})") from exc


class JsonlLog:
    """Append-only JSON lines, flushed and fsynced per record so a kill -9 loses at most one line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
        return out

    def keep(self, predicate) -> None:
        """Rewrite the log atomically with only the records that satisfy ``predicate``."""
        records = [r for r in self.read() if predicate(r)]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in records).encode())


def setup_logging(run_dir: Path | None, level: int = logging.INFO) -> logging.Logger:
    """Readable log to stderr and, with a run directory, to ``train.log`` in it."""
    logger = logging.getLogger("alr_fast")
    logger.setLevel(level)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if run_dir is not None:
        fh = logging.FileHandler(Path(run_dir) / "train.log", encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(fh)
    logger.propagate = False
    return logger


def iter_records(path: Path) -> Iterable[dict[str, Any]]:
    return JsonlLog(path).read()
