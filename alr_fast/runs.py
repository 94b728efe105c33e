"""Run directories: one owner at a time, checkpoints that load safely and only when intact, logs
that survive kills.

A run directory holds ``config.yaml`` (the resolved config), ``train.log``, ``metrics.jsonl`` (one
object per evaluation), ``losses.jsonl`` (one per log interval), ``factors.jsonl`` (A*hs(theta)
per regularized tensor, one line per epoch), ``factor_names.json``, ``checkpoint.pt`` (latest),
``best.pt`` (the selected model), ``plots/`` and, while a process owns it, ``run.lock``.

What this module guarantees (the README's "Guarantees" lists the user's view):

* **One owner.** ``RunLock`` takes ``run.lock`` with ``fcntl.flock`` and writes the owner's pid,
  host and command into it. The kernel releases the lock when the process ends, however it ends,
  so a file left by a killed process is detected (the lock is free) and reported, never a trap.
* **Atomic, verified writes.** Every file is written to a hidden temporary beside its target,
  fsynced, checked (a checkpoint's zip CRCs are read back) and renamed over the target; SIGINT
  and SIGTERM wait until the rename is done. A full disk surfaces as ``OSError(ENOSPC)`` naming
  the file, and the previous file stays. Temporaries left by a kill are removed at the next start.
* **Safe loading.** Checkpoints are plain data (tensors, numbers, strings, lists, dicts) loaded
  with ``torch.load(weights_only=True)``: a file that needs anything else, such as a pickle
  that would run code, is refused before any of it runs. Every record's CRC is checked first,
  so a damaged file is refused by name instead of loading as NaNs.
* **Honest logs.** JSONL records are strict JSON (a non-finite number is written as ``null``
  and its key listed under ``"non_finite"``); only a half-written last line, what a kill leaves,
  is dropped when a log is rewritten; a damaged line anywhere else is an error naming the line.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import pickle
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
CONFIG = "config.yaml"
LOCK = "run.lock"
FACTOR_NAMES = "factor_names.json"
LOGS = ("metrics", "losses", "factors")
# the checkpoint layout this version writes and reads: plain data only (no numpy objects)
CHECKPOINT_FORMAT = "alr-fast/2"

# what a start or a run writes before its first checkpoint; a directory holding only these (and
# no checkpoint) is a start that stopped early and may be reused by a retry
_RUN_FILES = frozenset({CONFIG, "train.log", FACTOR_NAMES, LOCK, *(f"{n}.jsonl" for n in LOGS)})
_RUN_FOLDERS = frozenset({"plots", "profile"})
# mkstemp names of _atomic_write: ".<target>.<random>.tmp"
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]+\.tmp$")


def _is_temporary(name: str) -> bool:
    """Whether ``name`` is the temporary of an atomic write of a file a run writes."""
    match = _TEMPORARY.match(name)
    return bool(match) and match.group("target") in _RUN_FILES | {CHECKPOINT, BEST}


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked (exists already, in use, nothing to resume)."""


class CheckpointError(RunDirError):
    """A checkpoint file that is damaged, unsafe to load, or not an alr-fast checkpoint."""


# --------------------------------------------------------------------------------------------
# Run directories: may this command use this folder?
# --------------------------------------------------------------------------------------------
def _foreign_entries(run: Path) -> list[str]:
    """Entries of ``run`` that no alr-fast start writes before its first checkpoint."""
    out = []
    for entry in sorted(run.iterdir()):
        name = entry.name
        if name in _RUN_FILES or (name in _RUN_FOLDERS and entry.is_dir()):
            continue
        if _is_temporary(name):
            continue
        out.append(name + ("/" if entry.is_dir() else ""))
    return out


def check_new_run_dir(path: str | Path, advice: str | None = None) -> bool:
    """May a new run start in ``path``? Returns True when it reuses a directory (False: fresh).

    A directory may be reused only when it holds no checkpoint and nothing but what an alr-fast
    start writes before its first checkpoint (config.yaml, train.log, the logs, run.lock): the
    trace of a start that failed or was stopped early. Anything else (a checkpoint, files
    alr-fast did not write) is refused and nothing in it is changed. ``advice`` replaces the
    default "Resume it with --resume" hint (the quickstart has its own).
    """
    run = Path(path)
    if not run.exists():
        return False
    if not run.is_dir():
        raise RunDirError(f"run directory {run} exists and is not a folder; choose another --out")
    if (run / CHECKPOINT).exists() or (run / BEST).exists():
        held = CHECKPOINT if (run / CHECKPOINT).exists() else BEST
        hint = advice or f"Continue it with: alr-fast train --resume {run}, or choose another --out."
        raise RunDirError(f"run directory {run} already holds a run ({held}); nothing was changed in it. {hint}")
    foreign = _foreign_entries(run)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunDirError(
            f"run directory {run} already exists and holds files alr-fast did not write ({shown}); "
            f"nothing was changed in it. Choose another --out."
        )
    return any(run.iterdir())


def check_resume_dir(path: str | Path) -> bool:
    """Is there something to resume in ``path``? True: a checkpoint; False: a start that stopped
    before its first checkpoint, which ``--resume`` starts again from epoch 1 with its config.yaml."""
    run = Path(path)
    if not run.is_dir():
        raise RunDirError(f"cannot resume {run}: no such run directory")
    if (run / CHECKPOINT).is_file():
        return True
    if (run / CONFIG).is_file():
        check_new_run_dir(run)  # the same rule as a retry: no best.pt, nothing foreign
        return False
    raise RunDirError(f"cannot resume {run}: it holds neither {CHECKPOINT} nor {CONFIG} (was a run started there?)")


def is_run_dir(path: str | Path) -> bool:
    run = Path(path)
    return any((run / n).exists() for n in (CONFIG, CHECKPOINT, BEST, LOCK))


def remove_temporaries(run: str | Path) -> list[tuple[str, int]]:
    """Delete the hidden temporaries a killed write left in ``run``; returns (name, bytes) each.

    Only call this while holding the run's lock: a live owner's temporary is never touched then.
    """
    removed = []
    for entry in Path(run).iterdir():
        if _is_temporary(entry.name) and entry.is_file():
            size = entry.stat().st_size
            entry.unlink(missing_ok=True)
            removed.append((entry.name, size))
    return sorted(removed)


# --------------------------------------------------------------------------------------------
# One owner per run directory
# --------------------------------------------------------------------------------------------
class RunLock:
    """Exclusive ownership of a run directory through ``DIR/run.lock``.

    ``fcntl.flock`` on the file, which holds the owner's pid, host, command and start time as
    JSON. The kernel drops the lock when its process exits, even by kill -9; a file whose lock is
    free is what such an exit leaves, and ``acquire`` reports it in ``stale``. Forked children
    (DataLoader workers) close their copy of the descriptor, so a killed owner's workers cannot
    keep holding it. On NFS ``flock`` is emulated with POSIX locks, which the server arbitrates.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK
        self._fd: int | None = None
        self.stale: dict | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, advice: str = "") -> "RunLock":
        """Take the lock or raise RunDirError naming the holder; ``advice`` ends that message."""
        if self._fd is not None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunDirError(self._in_use(advice)) from None
            except BaseException:
                os.close(fd)
                raise
            try:  # the previous holder may have removed the file between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        left = os.read(fd, 1 << 16)
        self.stale = _parse_owner(left) if left.strip() else None
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        cell = self._cell = [fd]  # shared with the fork hook, which must not keep the lock object alive

        def close_in_child() -> None:  # a forked child must not inherit the ownership
            if cell[0] is not None:
                with contextlib.suppress(OSError):
                    os.close(cell[0])
                cell[0] = None

        os.register_at_fork(after_in_child=close_in_child)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        self._cell[0] = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # before unlocking: a waiter then retries on a fresh file
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _in_use(self, advice: str) -> str:
        try:
            owner = _parse_owner(self.path.read_bytes())
        except OSError:
            owner = {}
        who = _describe_owner(owner) if owner else "a process that is starting up"
        return (f"run directory {self.dir} is in use by {who}; nothing was changed in it. Wait for it to "
                f"finish or stop it, then try again{'; ' + advice if advice else ''}.")

    def describe_stale(self) -> str | None:
        if not self.stale:
            return None
        return (f"{self.path} was left by {_describe_owner(self.stale)}, which ended without releasing it "
                f"(killed, or the machine went down); taken over")

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _parse_owner(raw: bytes) -> dict:
    try:
        owner = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"unreadable": raw[:80].decode("utf-8", "replace")}
    return owner if isinstance(owner, dict) else {"unreadable": str(owner)[:80]}


def _describe_owner(owner: dict) -> str:
    if "pid" not in owner:
        return f"an unknown process (lock file content {owner.get('unreadable', owner)!r})"
    command = f", `{owner['command']}`" if owner.get("command") else ""
    return f"pid {owner['pid']} on host {owner.get('host', '?')} (since {owner.get('since', '?')}{command})"


# --------------------------------------------------------------------------------------------
# Atomic, verified writes
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def signals_deferred(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
    """Hold SIGINT/SIGTERM until the block is done, then deliver the first one that came.

    A write that has started finishes (or fails) before an interrupt takes effect, so an
    interrupt never surfaces as a torch serializer error. Outside the main thread, where Python
    cannot set handlers, the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        if pending:
            signal.raise_signal(pending[0])


class _Sink:
    """A file object for torch.save that keeps the OSError torch's serializer would hide.

    torch.save reports a failed write (ENOSPC, EIO) as ``RuntimeError: [enforce fail at
    inline_container.cc] ... unexpected pos``; the original error is kept here to be re-raised.
    """

    def __init__(self, fh) -> None:
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _current_umask() -> int:
    try:  # Linux reports it without changing it (no window in which another thread's files get 0o077)
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)  # elsewhere reading the umask means setting it; set it straight back
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write: Callable[[Any], None], verify: Callable[[Path], None] | None = None) -> None:
    """``write(fh)`` into a temporary beside ``path``, fsync, ``verify(temporary)``, rename over ``path``.

    The previous ``path`` stays until a complete, verified file replaces it. A failing write
    raises its OSError with the target's name (errno kept, e.g. ENOSPC).
    """
    path = Path(path)
    with signals_deferred():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp makes 0600; the file gets what open() would give
            with os.fdopen(fd, "wb") as fh:
                sink = _Sink(fh)
                try:
                    write(sink)
                except RuntimeError:
                    if sink.error is not None:
                        raise sink.error from None
                    raise
                fh.flush()
                os.fsync(fh.fileno())
            if verify is not None:
                verify(Path(tmp))
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            if exc.errno is not None and not exc.filename:  # name the file the user knows, not the temporary
                raise OSError(exc.errno, exc.strerror, str(path)) from None
            raise
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_write(Path(path), lambda fh: fh.write(data))


def verify_archive(path: str | Path, name: str | Path | None = None) -> None:
    """Check every record of a torch zip archive against its CRC; raise CheckpointError naming
    ``name`` (default ``path``) and the first damaged record."""
    name = name or path
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as exc:
        raise CheckpointError(
            f"{name} is not a readable checkpoint archive ({exc}): damaged, truncated, or another kind of file; "
            f"nothing was loaded from it"
        ) from None
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {name} is damaged: its record '{bad}' fails the CRC check; nothing was loaded from it"
        )


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save ``state`` (plain data and tensors) atomically; the written file's CRCs are
    checked before it replaces ``path``."""
    path = Path(path)
    _atomic_write(path, lambda fh: torch.save(state, fh), verify=lambda tmp: verify_archive(tmp, f"{path} (as written)"))


# --------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------
def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """A checkpoint file, or a run directory's best.pt (its checkpoint.pt when it has none).

    Returns (file, note): the note says why that file was picked when ``path`` is a directory.
    """
    path = Path(path)
    if path.is_dir():
        if (path / BEST).is_file():
            return path / BEST, f"{path} is a run directory: evaluating its {BEST} (the selected model)"
        if (path / CHECKPOINT).is_file():
            return path / CHECKPOINT, (
                f"{path} has no {BEST} (written at the first model selection, or at the end of training): "
                f"evaluating {CHECKPOINT}, the latest checkpoint"
            )
        raise RunDirError(f"{path} holds neither {BEST} nor {CHECKPOINT}")
    if not path.is_file():
        raise RunDirError(f"checkpoint {path} does not exist")
    return path, ""


def _refusal(path: Path, exc: Exception) -> CheckpointError:
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = f"the Python object {found.group(1)}" if found else "Python objects"
    return CheckpointError(
        f"checkpoint {path} is refused: it needs {what}, and loading that could run arbitrary code. "
        f"alr-fast checkpoints ({CHECKPOINT_FORMAT}) hold only tensors and plain data; files written by "
        f"older alr-fast versions (with numpy arrays inside) are refused the same way"
    )


def _torch_load(path: Path, **kwargs) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None
    except Exception as exc:  # a truncated or foreign file that passed the CRC check
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc.__class__.__name__}: {exc})") from None


def _check_format(path: Path, state: Any) -> dict[str, Any]:
    if not isinstance(state, dict) or "format" not in state:
        keys = f"keys {', '.join(map(str, list(state)[:6]))}" if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is a torch file but not an alr-fast checkpoint ({keys})")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {state['format']!r}; this alr-fast reads {CHECKPOINT_FORMAT!r}"
        )
    return state


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load an alr-fast checkpoint onto the CPU: CRCs first, then ``weights_only`` unpickling."""
    path, _ = resolve_checkpoint(path)
    verify_archive(path)
    return _check_format(path, _torch_load(path))


def peek_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents without reading its tensors (memory-mapped, for its config and
    counters); the pickle's own record is CRC-checked as it is read."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith("/data.pkl"):
                    archive.read(name)  # raises on a CRC mismatch
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged or not a checkpoint archive ({exc})") from None
    state = _check_format(path, _torch_load(path, mmap=True))
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"checkpoint {path} holds no config")
    return state


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The config stored in a checkpoint (see ``peek_checkpoint``)."""
    return peek_checkpoint(path)["config"]


# --------------------------------------------------------------------------------------------
# JSONL logs
# --------------------------------------------------------------------------------------------
def strict_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with every non-finite float replaced by None; their keys listed in "non_finite"."""
    bad: list[str] = []

    def clean(value, key: str):
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(key)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, key) for v in value]
        return value

    out = clean(record, "")
    if bad:
        out["non_finite"] = sorted(set(bad))
    return out


class JsonlLog:
    """Append-only JSON lines, flushed and fsynced per record so a kill -9 loses at most one line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(strict_record(record), allow_nan=False) + "\n"
        try:
            with signals_deferred(), open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            if exc.errno is None or exc.filename:
                raise
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None

    def read(self, strict: bool = False) -> list[dict[str, Any]]:
        """The records; a half-written last line (no newline) is skipped. A damaged line
        elsewhere is skipped too, or with ``strict`` raises RunDirError naming it."""
        if not self.path.is_file():
            return []
        lines = self.path.read_bytes().split(b"\n")
        out = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except (UnicodeDecodeError, ValueError) as exc:
                if number == len(lines):  # no newline after it: the write a kill cut short
                    continue
                if strict:
                    shown = line[:60].decode("utf-8", "replace")
                    raise RunDirError(
                        f"{self.path} line {number} is damaged ({exc.__class__.__name__}: {shown!r}); "
                        f"alr-fast only drops a half-written last line by itself. Repair or delete that line, "
                        f"then run the command again"
                    ) from None
                continue
            out.append(record)
        return out

    def keep(self, predicate: Callable[[dict], bool], records: list[dict] | None = None) -> int:
        """Rewrite the log atomically with only the records that satisfy ``predicate``; returns
        how many were dropped. A damaged line other than the last is an error (nothing is changed).
        ``records``: what ``read(strict=True)`` returned, when the caller has just read it."""
        records = self.read(strict=True) if records is None else records
        kept = [r for r in records if predicate(r)]
        if self.path.is_file() or kept:
            data = "".join(json.dumps(strict_record(r), allow_nan=False) + "\n" for r in kept)
            atomic_write_bytes(self.path, data.encode())
        return len(records) - len(kept)


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


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
