"""How a training run stops when it must: divergence, SIGINT/SIGTERM, a full disk.

* ``nonfinite_tensors`` finds NaN/inf in the weights with one multi-tensor reduction and one
  host sync; the trainer calls it before every checkpoint and evaluation, never inside the step.
* ``StopSignals`` turns SIGTERM into an exception (``Terminated``, like SIGINT's
  ``KeyboardInterrupt``), so that a stop unwinds the loop: loader workers are shut down, the
  run's lock is released, and one message says where the last checkpoint is.
* ``RunStopped`` carries that message and the exit code (130 SIGINT, 143 SIGTERM, 1 full disk);
  ``DivergenceError`` (exit 5) the divergence report.
"""
from __future__ import annotations

import signal
import threading

import torch

from .distributed import DistEnv, all_reduce_mean

EXIT_DIVERGED = 5
EXIT_DISK_FULL = 1
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Terminated(BaseException):
    """SIGTERM, raised in the main thread; a BaseException like KeyboardInterrupt, so that no
    ``except Exception`` on the way swallows it."""


class DivergenceError(RuntimeError):
    """The losses or the weights are no longer finite; the message says where and what to try."""


class RunStopped(Exception):
    """A run stopped by a signal or a full disk; ``str`` is the one-line report for the user."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """While active (main thread only): SIGTERM raises ``Terminated``, SIGINT ``KeyboardInterrupt``,
    and ``received`` records which came, so that an error they cause elsewhere (a DataLoader worker
    killed by the same signal) is still reported as the interruption it is."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received.append(signum)
        if signum == signal.SIGTERM:
            raise Terminated()
        raise KeyboardInterrupt()

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNAL_EXIT:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def signal_of(self, exc: BaseException) -> int | None:
        """The signal behind ``exc``, if any."""
        if isinstance(exc, Terminated):
            return signal.SIGTERM
        if isinstance(exc, KeyboardInterrupt):
            return signal.SIGINT
        return self.received[0] if self.received else None


def nonfinite_tensors(named: list[tuple[str, torch.Tensor]], env: DistEnv | None = None) -> list[str]:
    """Names of the tensors that hold a NaN or an infinity; [] when all are finite.

    One ``torch._foreach_norm(ord=inf)`` (the largest magnitude of each tensor; NaN propagates)
    and one host sync for the all-finite answer; names are only looked up when something is
    wrong. With several processes the verdict is shared, so that every rank stops together.
    """
    tensors = [t.detach() for _, t in named if t.is_floating_point() and t.numel()]
    if not tensors:
        return []
    norms = torch.stack(torch._foreach_norm(tensors, float("inf")))
    finite = torch.isfinite(norms)
    bad = (~finite).float().amax().reshape(1)
    if env is not None and env.enabled:
        bad = all_reduce_mean(bad, env)
    if not bool(bad.item()):  # host sync: once per checkpoint / evaluation
        return []
    floating = [n for n, t in named if t.is_floating_point() and t.numel()]
    names = [n for n, ok in zip(floating, finite.tolist()) if not ok]
    return names or ["(another process's weights)"]


def divergence_advice(optim, precision: str) -> str:
    """What to try when a run diverges, in config keys."""
    lr_keys = "optim.lr_base" if optim.lr_mode == "default" else "optim.lr_start / optim.lr_end"
    lr_now = f"{optim.lr_base:g}" if optim.lr_mode == "default" else f"{optim.lr_start:g} / {optim.lr_end:g}"
    tips = [f"a lower learning rate ({lr_keys}, now {lr_now})"]
    if precision != "fp32":
        tips.append(f"run.precision=fp32 (now {precision})")
    tips.append("a larger optim.adam_eps (now %g)" % optim.adam_eps)
    return "Try " + ", or ".join(tips) + ", in a new run (--out DIR): --resume would repeat the same steps"
