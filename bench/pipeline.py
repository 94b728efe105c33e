"""Data-pipeline benchmark (``alr-fast bench pipeline``): images/s of the training loaders

  torch          (a) torch DataLoader, CPU reference pipeline, ``--workers`` processes, decoding every step
  dali           (b) DALI, decoding every step (nvJPEG on a GPU), external source in the main thread
  dali_parallel  (b') the same with DALI's parallel external source (``--dali-workers`` processes)
  cache          (c) decode-once cache on the device, augmentation as a few torch ops per step

each measured alone (``loader``: batches pulled as fast as they come) and feeding the model's
training step (``train``: total images/s), beside the step on a device-resident batch
(``compute``: the ceiling a loader can reach). Every loader hands over images as the trainer takes
them: on a GPU in the autocast dtype (bf16 by default) with channels_last strides, on a CPU in
float32. All in one run on one device, written to
``bench/results/pipeline-<device>-<date>.json`` with the device name and torch/DALI/CUDA versions,
plus a PNG plot. images/s = steps * batch / total time of steps run back to back (one device
synchronisation at the end); the latency percentiles come from as many steps again, each
synchronised (deliberately: it makes per-step latency measurable).

Loaders that prepare batches ahead (the DataLoader's workers x prefetch factor 2, DALI's prefetch
queue) would, timed over few batches, report how fast ready batches are handed over, not how fast
they are made: with 8 workers and 2 timed batches the "loader alone" figure was the queue
hand-off (44,000 images/s at 32x16 on 2 cores, p50 0.09 ms per batch). So each loader first
drains its in-flight batches after the warm-up, and times at least 4x as many batches as it
holds in flight (raised with a note where --steps is smaller); both figures are in the JSON.

Data: a synthetic Market-1501-layout set (real JPEGs, 128x64 like Market's crops) written to a
temporary folder, or ``--data ROOT --dataset NAME`` for a real one. Runs on a CPU too (DALI's CPU
operators); without flags on a CPU it picks CPU-sized work (128x64, P8xK4, ResNet-18 for the
train mode, a few batches) and says so.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from alr_fast.bench.common import (
    add_out_argument, apply_sized_defaults, bar_label, environment, finish_plot, result_path, sized_help, time_steps,
    write_result,
)

LOADERS = ("torch", "dali", "dali_parallel", "cache")
MODES = ("loader", "train")


GPU_SIZES = dict(height=384, width=128, P=16, K=4, steps=50, warmup=5, workers=8, dali_workers=4, dali_threads=4,
                 backbone="resnet50", ids=200)
CPU_SIZES = dict(height=128, width=64, P=8, K=4, steps=10, warmup=2, workers=2, dali_workers=2, dali_threads=2,
                 backbone="resnet18", ids=40)
MIN_TIMED_PER_IN_FLIGHT = 4  # timed batches per batch a loader holds in flight


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alr-fast bench pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loaders", default=",".join(LOADERS), help=f"comma-separated subset of {', '.join(LOADERS)}")
    p.add_argument("--modes", default=",".join(MODES), help="loader (alone), train (feeding the step), or both")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--height", type=int, default=None, help=sized_help("", "height", GPU_SIZES, CPU_SIZES))
    p.add_argument("--width", type=int, default=None, help=sized_help("", "width", GPU_SIZES, CPU_SIZES))
    p.add_argument("--P", type=int, default=None, help=sized_help("identities per batch", "P", GPU_SIZES, CPU_SIZES))
    p.add_argument("--K", type=int, default=None, help=sized_help("images per identity", "K", GPU_SIZES, CPU_SIZES))
    p.add_argument("--steps", type=int, default=None, help=sized_help(
        "timed batches per loader and mode", "steps", GPU_SIZES, CPU_SIZES,
        f"at least {MIN_TIMED_PER_IN_FLIGHT}x the loader's in-flight batches"))
    p.add_argument("--warmup", type=int, default=None, help=sized_help("untimed batches first: pipeline build, worker start",
                                                                     "warmup", GPU_SIZES, CPU_SIZES))
    p.add_argument("--workers", type=int, default=None, help=sized_help("DataLoader worker processes of the torch loader",
                                                                      "workers", GPU_SIZES, CPU_SIZES))
    p.add_argument("--dali-workers", type=int, default=None, help=sized_help(
        "external-source worker processes of dali_parallel", "dali_workers", GPU_SIZES, CPU_SIZES))
    p.add_argument("--dali-threads", type=int, default=None, help=sized_help("DALI CPU threads", "dali_threads", GPU_SIZES, CPU_SIZES))
    p.add_argument("--backbone", default=None, help=sized_help("model of the train mode", "backbone", GPU_SIZES, CPU_SIZES))
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--ids", type=int, default=None, help=sized_help("training identities of the synthetic set", "ids",
                                                                  GPU_SIZES, CPU_SIZES))
    p.add_argument("--data", default="", help="dataset root (default: synthetic data in a temporary folder)")
    p.add_argument("--dataset", default="market1501", help="layout under --data: market1501, dukemtmc_reid, msmt17")
    add_out_argument(p)
    p.add_argument("--no-plot", action="store_true")
    return p


def in_flight_batches(kind: str, args) -> int:
    """Batches a loader prepares ahead of the consumer: the DataLoader's workers x its prefetch
    factor (2), DALI's prefetch queue (2); the cache makes each batch when asked."""
    if kind == "torch":
        return 2 * args.workers
    if kind in ("dali", "dali_parallel"):
        return 2
    return 0


def _subset(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in allowed]
    if unknown or not chosen:
        raise SystemExit(
            f"alr-fast bench pipeline: unknown {what} {', '.join(unknown) or '(none)'}; choose from {', '.join(allowed)}"
        )
    return chosen


def _training_set(args, tmp: str):
    """(JpegStore, labels, camids, num_classes) of the training split."""
    from alr_fast.datasets import read_dataset
    from alr_fast.pipelines.jpeg_store import load_jpeg_store

    root, name = args.data, args.dataset
    if not root:
        from alr_fast.synthetic import make_synthetic

        root, name = tmp, "market1501"
        make_synthetic(tmp, "market1501", num_train_ids=max(args.ids, args.P), num_test_ids=2, num_distractors=1, seed=0)
    dataset = read_dataset(name, root)
    store, kept = load_jpeg_store([r.path for r in dataset.train])
    records = [dataset.train[i] for i in kept]
    labels = np.asarray(dataset.train_labels)[kept]
    return store, labels, np.array([r.camid for r in records], dtype=np.int64), dataset.num_classes


def _build_loader(kind: str, args, data, device: torch.device, dtype: torch.dtype, channels_last: bool, steps: int):
    """A loader whose one epoch covers warmup and timed batches; DALI missing raises ImportError."""
    from alr_fast.pipelines.sampler import IdentitySampler

    store, labels, camids, _ = data
    sampler = IdentitySampler(labels, args.P, args.K, steps, seed=0)
    common = dict(height=args.height, width=args.width, seed=0, device=device, dtype=dtype, channels_last=channels_last)
    if kind == "torch":
        from alr_fast.pipelines.torch_loader import TorchTrainLoader

        return TorchTrainLoader(store, labels, camids, sampler, num_workers=args.workers, decoded_cache=False, **common)
    if kind == "cache":
        from alr_fast.pipelines.gpu_cache import DecodedCacheTrainLoader

        return DecodedCacheTrainLoader(store, labels, camids, sampler, num_workers=args.dali_threads, **common)
    from alr_fast.data import _device_id
    from alr_fast.pipelines.dali import DaliTrainLoader

    workers = args.dali_workers if kind == "dali_parallel" else 0
    return DaliTrainLoader(store, labels, camids, sampler, num_workers=workers, device_id=_device_id(device),
                           num_threads=args.dali_threads, **common)


def _trainer(args, num_classes: int, device: torch.device, channels_last: bool):
    from alr_fast.config import load_config
    from alr_fast.task import build_task
    from alr_fast.trainer import Trainer, build_optimizer, resolve_precision

    cfg = load_config(None, [f"model.backbone={args.backbone}", "model.pretrained=none", f"run.precision={args.precision}"])
    torch.manual_seed(0)
    task = build_task(cfg, num_classes).to(device)
    if channels_last:
        task.model.to(memory_format=torch.channels_last)
    task.train()
    return Trainer(task, build_optimizer(task, cfg.optim, device), device=device,
                   precision=resolve_precision(cfg.run.precision, device))


def _summary(stats: dict, batch: int) -> dict:
    return {
        "images_per_s": stats["steps"] * batch / stats["total_s"],
        "latency_ms": {k: 1e3 * stats[f"{k}_s"] for k in ("mean", "p50", "p90", "p99")},
        "steps": stats["steps"],
    }


def _input_dtype(args, device: torch.device) -> torch.dtype:
    """The dtype the trainer takes its images in (the rule ``alr_fast.trainer`` builds its loaders by)."""
    from alr_fast.trainer import input_dtype, resolve_precision

    return input_dtype(resolve_precision(args.precision, device), device)


def _compute(args, trainer, device: torch.device) -> dict:
    """The training step on one device-resident batch: what a loader that costs nothing would give."""
    batch = args.P * args.K
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, args.height, args.width, generator=g).to(device, _input_dtype(args, device))
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(args.P).repeat_interleave(args.K).to(device)
    resident = (images, labels, torch.zeros_like(labels))
    return _summary(time_steps(lambda: trainer.train_step(resident), device, args.steps, args.warmup), batch)


def run_loader(kind: str, modes: list[str], args, data, device, trainer) -> dict:
    channels_last = device.type == "cuda"
    batch = args.P * args.K
    depth = in_flight_batches(kind, args)
    warmup = args.warmup + depth  # the warm-up, then the batches made ahead during it: not timed
    steps = max(args.steps, MIN_TIMED_PER_IN_FLIGHT * depth)
    if steps > args.steps:
        print(f"  {kind} holds {depth} batches in flight: timing {steps} batches instead of {args.steps}",
              file=sys.stderr)
    t0 = time.perf_counter()
    dtype = _input_dtype(args, device)
    loader = _build_loader(kind, args, data, device, dtype, channels_last, warmup + 2 * steps)
    out: dict = {"setup_s": time.perf_counter() - t0, "in_flight_batches": depth, "warmup_batches": warmup}
    if kind == "cache":
        out["cache_bytes"] = loader.nbytes
    for mode in modes:
        batches = iter(loader)  # a fresh epoch: warmup, then steps pipelined and steps synchronised

        if mode == "loader":
            def step():
                return next(batches)
        else:
            def step():
                return trainer.train_step(next(batches))
        progress = f"  {kind} {mode}" if device.type != "cuda" else None
        out[mode] = _summary(time_steps(step, device, steps, warmup, progress=progress), batch)
        for _ in batches:  # finish the epoch so the next one starts cleanly
            pass
    del loader
    return out


def _plot(path: Path, results: dict, compute: dict | None, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k, r in results.items() if "skipped" not in r]
    modes = [m for m in MODES if any(m in results[k] for k in kinds)]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(kinds) + 1), 4))
    width = 0.8 / max(len(modes), 1)
    for i, mode in enumerate(modes):
        values = [results[k].get(mode, {}).get("images_per_s", 0.0) for k in kinds]
        xs = np.arange(len(kinds)) + (i - (len(modes) - 1) / 2) * width
        bars = ax.bar(xs, values, width, label="loader alone" if mode == "loader" else "feeding the training step")
        for b, v in zip(bars, values):
            ax.text(b.get_x() + b.get_width() / 2, v, bar_label(v), ha="center", va="bottom", fontsize=7)
    if compute:
        ax.axhline(compute["images_per_s"], color="k", ls="--", lw=1, label="training step alone (compute)")
    ax.set_xticks(np.arange(len(kinds)), kinds)
    heights = [b.get_height() for b in ax.patches if b.get_height() > 0]
    if heights and max(heights) > 30 * min(heights):  # loaders alone can be 100x the step
        ax.set_yscale("log")
    return finish_plot(fig, ax, path, "images/s", title, legend=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    loaders = _subset(args.loaders, LOADERS, "loader(s)")
    modes = _subset(args.modes, MODES, "mode(s)")
    from alr_fast.trainer import resolve_device

    device = resolve_device(args.device)
    apply_sized_defaults(args, device, GPU_SIZES, CPU_SIZES, "bench pipeline")
    if min(args.steps, args.P, args.K) < 1 or args.warmup < 0:
        raise SystemExit("alr-fast bench pipeline: --steps, --P and --K must be >= 1 and --warmup >= 0")
    env = environment(device)
    env["torchvision"] = __import__("torchvision").__version__
    batch = args.P * args.K
    results: dict = {}
    compute = None
    with tempfile.TemporaryDirectory() as tmp:
        if not args.data:
            print(f"bench pipeline: writing a synthetic Market-1501-layout set ({args.ids} identities) ...",
                  file=sys.stderr, flush=True)
        data = _training_set(args, tmp)
        trainer = _trainer(args, data[3], device, device.type == "cuda") if "train" in modes else None
        for kind in loaders:
            print(f"bench pipeline: {kind} ...", file=sys.stderr, flush=True)
            try:
                results[kind] = run_loader(kind, modes, args, data, device, trainer)
            except ImportError as exc:  # DALI not installed: the other loaders still count
                results[kind] = {"skipped": str(exc)}
                print(f"bench pipeline: {kind} skipped: {exc}", file=sys.stderr)
                continue
            for mode in modes:
                r = results[kind][mode]
                print(f"  {mode}: {r['images_per_s']:,.1f} images/s, p50 {r['latency_ms']['p50']:.2f} ms, "
                      f"p99 {r['latency_ms']['p99']:.2f} ms", file=sys.stderr)
        if trainer is not None:  # last, so that the step is as warm as when the loaders fed it
            print("bench pipeline: compute (training step on a resident batch) ...", file=sys.stderr, flush=True)
            compute = _compute(args, trainer, device)
            for r in results.values():
                if "train" in r:
                    r["train"]["fraction_of_compute"] = r["train"]["images_per_s"] / compute["images_per_s"]
    payload = {
        "kind": "pipeline",
        "environment": env,
        "args": vars(args),
        "dataset": {"images": len(data[0]), "identities": int(len(np.unique(data[1]))), "jpeg_bytes": data[0].nbytes},
        "batch_size": batch,
        "input_dtype": str(_input_dtype(args, device)).removeprefix("torch."),
        "compute": compute,
        "results": results,
    }
    path = write_result(result_path(Path(args.out), "pipeline", env), payload)
    if not args.no_plot and any("skipped" not in r for r in results.values()):
        title = f"training loaders, P{args.P}xK{args.K} {args.height}x{args.width} on {env['device_name']}"
        _plot(path.with_suffix(".png"), results, compute, title)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
