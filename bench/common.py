"""Shared pieces of the benchmarks: environment description, timing, result files, plots."""
from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

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


def time_steps(
    step: Callable[[], object], device: torch.device, steps: int, warmup: int, *, progress: str | None = None
) -> dict:
    """Run ``warmup`` untimed steps, then ``steps`` steps twice: back to back with one
    synchronisation at the end, as a training loop runs (the host queues step i+1 while the device
    runs step i), for the throughput (``total_s``, ``mean_s``); and each step synchronised (a
    deliberate sync that makes per-step latency measurable) for the percentiles. ``warmup_s`` is
    the warm-up's wall time (compilation happens there). ``progress``: a label for a progress bar
    on stderr (slow steps, e.g. on a CPU)."""
    bar = tqdm(total=warmup + 2 * steps, desc=progress, disable=progress is None, leave=False, file=sys.stderr)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
        bar.update()
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    start = time.perf_counter()
    for _ in range(steps):
        step()
        bar.update()
    synchronize(device)
    total = time.perf_counter() - start
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        bar.update()
    bar.close()
    q = np.percentile(times, [50, 90, 99]).tolist()
    return {"steps": steps, "warmup_steps": warmup, "warmup_s": warmup_s, "total_s": total, "mean_s": total / steps,
            "p50_s": q[0], "p90_s": q[1], "p99_s": q[2], "stdev_s": statistics.pstdev(times),
            "synced_mean_s": statistics.fmean(times)}


def device_slug(name: str) -> str:
    """A device name as a file-name part: ``NVIDIA H200`` -> ``nvidia-h200``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", str(name)).strip("-").lower() or "device"


def result_path(out_dir: Path, kind: str, env: dict) -> Path:
    """``<out>/<kind>-<device>-<YYYYmmdd-HHMMSS>.json``, the one naming rule of every benchmark
    (date and time: a second run the same day must not overwrite the first)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(out_dir) / f"{kind}-{device_slug(env['device_name'])}-{stamp}.json"


def json_value(value: Any) -> Any:
    """Arguments and figures as JSON numbers, booleans and strings (paths as text, numpy scalars
    as Python numbers), so that readers of the result files never parse "3.5" back."""
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def write_result(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_value(payload), indent=1))
    return path


def add_out_argument(p) -> None:
    """``--out DIR``: the same flag for the output folder in every benchmark."""
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder for the JSON result and the plot (default {DEFAULT_OUT})")


def sized_help(what: str, name: str, gpu: dict[str, Any], cpu: dict[str, Any], note: str = "") -> str:
    """Help text of an option that ``apply_sized_defaults`` fills: its defaults read from the same
    tables, so that ``--help`` cannot drift from what a run takes."""
    g, c = gpu[name], cpu[name]
    default = f"default {g}" if g == c else f"default {g} on a GPU, {c} on a CPU"
    inside = f"{default}; {note}" if note else default
    return f"{what} ({inside})" if what else inside


def apply_sized_defaults(args, device: torch.device, gpu: dict[str, Any], cpu: dict[str, Any], prog: str) -> list[str]:
    """Fill the options left unset (``None``) with GPU- or CPU-sized values and say so.

    A benchmark run without flags on a CPU must finish in minutes, not run the GPU workload for an
    hour: on a CPU the ``cpu`` values apply and one line on stderr lists them (and how to change
    them). Returns the names of the options that took a default.
    """
    sized = gpu if device.type == "cuda" else cpu
    filled = [k for k in sized if getattr(args, k, None) is None]
    for k in filled:
        setattr(args, k, sized[k])
    if device.type != "cuda" and filled:
        shown = ", ".join(f"--{k.replace('_', '-')} {sized[k]}" for k in filled)
        print(f"{prog}: no GPU, so CPU-sized defaults: {shown} (set any of them to change it)", file=sys.stderr)
    return filled


def bar_label(value: float) -> str:
    """A bar's value: thousands separated, three significant digits below 100 (CPU rates)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def finish_plot(fig, ax, path: Path, ylabel: str, title: str, legend: bool = False) -> Path:
    """Label, lay out, save at 110 dpi and close: the last lines of every benchmark plot."""
    import matplotlib.pyplot as plt

    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bar_plot(path: Path, labels: list[str], values: list[float], ylabel: str, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels)), 4))
    bars = ax.bar(labels, values, color="tab:blue")
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, v, bar_label(v), ha="center", va="bottom", fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
    return finish_plot(fig, ax, path, ylabel, title)


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
    return finish_plot(fig, ax, path, ylabel, title, legend=True)
