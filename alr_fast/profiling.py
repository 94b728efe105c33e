"""Named ranges for profilers and a torch.profiler window over a few training steps.

``Regions`` marks data, forward, backward, regularizer, optimizer and evaluation: as
``record_function`` labels (seen in torch.profiler traces) and, on a GPU, as NVTX ranges (seen in
Nsight Systems). Disabled, it costs one attribute check per region. Inside code that torch.compile
traces (the task's forward) a region is a no-op: NVTX calls would break the graph (and with it the
CUDA-graph capture), and a marker traced once would not mark the replays anyway.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch


class _Range:
    """One named range: a ``record_function`` label and, on a GPU, an NVTX range."""

    def __init__(self, name: str, nvtx: bool) -> None:
        self.name, self.nvtx = name, nvtx
        self.record = torch.profiler.record_function(name)

    def __enter__(self) -> None:
        self.record.__enter__()
        if self.nvtx:
            torch.cuda.nvtx.range_push(self.name)

    def __exit__(self, *exc) -> None:
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        self.record.__exit__(*exc)


class Regions:
    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled
        self.nvtx = enabled and torch.cuda.is_available()

    def __call__(self, name: str):
        # a plain function returning nullcontext while dynamo traces: no generator-based context
        # manager for dynamo to inline, which older torch releases could only trace by breaking
        # the graph
        if not self.enabled or torch.compiler.is_compiling():
            return contextlib.nullcontext()
        return _Range(name, self.nvtx)


def step_profiler(out_dir: Path, active_steps: int, warmup_steps: int = 2):
    """A torch.profiler that skips 1 step, warms up ``warmup_steps`` and records ``active_steps``,
    then writes a Chrome trace (``trace.json``) and a table of the top ops (``summary.txt``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def write(prof) -> None:
        prof.export_chrome_trace(str(out_dir / "trace.json"))
        key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        (out_dir / "summary.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=40))

    return torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=1, warmup=warmup_steps, active=active_steps, repeat=1),
        on_trace_ready=write,
        record_shapes=True,
    )
