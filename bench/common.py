"""Shared pieces of the benchmarks: environment description, timing, result files, plots."""
from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

DEFAULT_OUT = Path("bench/results")


def environment(device: torch.device) -> dict:
    """Device name and library versions, recorded in every result file."""
    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "numpy": np.__version__,
        "cpu_threads": torch.get_num_threads(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    for name, module in (("dali", "nvidia.dali"), ("cupy", "cupy")):
        try:
            env[name] = __import__(module, fromlist=["__version__"]).__version__
        except Exception:
            env[name] = None
    return env


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], device: torch.device, steps: int, warmup: int) -> dict:
    """Run ``warmup`` untimed steps, then ``steps`` steps twice: back to back with one
    synchronisation at the end, as a training loop runs (the host queues step i+1 while the device
    runs step i), for the throughput (``total_s``, ``mean_s``); and each step synchronised (a
    deliberate sync that makes per-step latency measurable) for the percentiles."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    total = time.perf_counter() - start
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    q = np.percentile(times, [50, 90, 99]).tolist()
    return {"steps": steps, "total_s": total, "mean_s": total / steps, "p50_s": q[0], "p90_s": q[1], "p99_s": q[2],
            "stdev_s": statistics.pstdev(times), "synced_mean_s": statistics.fmean(times)}


def result_path(out_dir: Path, kind: str, env: dict) -> Path:
    name = re.sub(r"[^A-Za-z0-9]+", "-", str(env["device_name"])).strip("-").lower() or "device"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(out_dir) / f"{kind}-{name}-{stamp}.json"


def write_result(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    return path


def bar_label(value: float) -> str:
    """A bar's value: thousands separated, three significant digits below 100 (CPU rates)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def bar_plot(path: Path, labels: list[str], values: list[float], ylabel: str, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels)), 4))
    bars = ax.bar(labels, values, color="tab:blue")
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, v, bar_label(v), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stacked_bar_plot(path: Path, labels: list[str], stages: list[str], values: list[list[float]], ylabel: str,
                     title: str) -> Path:
    """One bar per label, stacked by stage (``values[label][stage]``), its total written on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(labels)), 4.5))
    bottom = np.zeros(len(labels))
    for i, stage in enumerate(stages):
        heights = np.array([v[i] for v in values], dtype=float)
        if heights.any():
            ax.bar(labels, heights, bottom=bottom, label=stage)
        bottom += heights
    for x, total in enumerate(bottom):
        ax.text(x, total, bar_label(total), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
