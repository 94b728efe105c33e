"""Training-step benchmark (``alr-fast bench train``): images/s and step-time percentiles of

  eager_no_penalty     model on device-resident tensors, eager, no regularizer (the floor)
  eager_reference      (a)  eager, adaptive L2 as the per-tensor Python loop
  eager_fused          (a') eager, fused adaptive L2 (one multi-tensor norm; weight gradients added
                            after backward by one multi-tensor op)
  captured_cudagraphs  (b') fused step under run.compile=cudagraphs: CUDA graphs of the eager
                            kernels (AOT autograd, no Inductor): compiles in seconds
  captured             (b)  fused step under run.compile=reduce-overhead: Inductor's fused kernels in
                            CUDA graphs (minutes of compilation; the trainer's default on a GPU)
  dali                 (c)  the captured step fed end to end by the DALI pipeline
  torch_loader         (d)  the captured step fed end to end by the torch DataLoader reference pipeline

all in one run, with ratios against each other, the warm-up (compilation) time of each mode, peak
memory, a JSON file in bench/results/ that names the device and versions, and a bar plot.
Throughput is steps*batch/total time of steps run back to back, as in training (one
synchronisation at the end); the step-time percentiles come from as many steps again, each
synchronised (deliberately, so that they mean something).

On a CPU, without flags, it runs CPU-sized work (ResNet-18, 128x64, P4xK4, a few steps) and says
so; "captured" (Inductor) is then left out unless --modes names it, since Inductor compiles the
step for minutes on a CPU and CUDA graphs need a GPU anyway.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch

from alr_fast.bench.common import (
    add_out_argument, apply_sized_defaults, bar_plot, environment, result_path, sized_help, time_steps, write_result,
)
from alr_fast.config import load_config
from alr_fast.trainer import Trainer, build_optimizer, input_dtype, resolve_device, resolve_precision

MODES = ("eager_no_penalty", "eager_reference", "eager_fused", "captured_cudagraphs", "captured", "dali", "torch_loader")
# mode -> run.compile of its step (``None``: the --capture choice, for the end-to-end modes)
COMPILE_OF_MODE = {"captured_cudagraphs": "cudagraphs", "captured": "reduce-overhead", "dali": None, "torch_loader": None}
GPU_SIZES = dict(backbone="resnet50", height=384, width=128, P=16, K=4, steps=50, warmup=10, workers=8)
CPU_SIZES = dict(backbone="resnet18", height=128, width=64, P=4, K=4, steps=5, warmup=2, workers=2)
CPU_SKIPPED = {"captured": "Inductor (reduce-overhead) compiles the step for minutes on a CPU and CUDA graphs need a "
                           "GPU; name it in --modes to run it anyway"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alr-fast bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=None, help=f"comma-separated subset of {', '.join(MODES)} (default: all; on a "
                   "CPU all but captured)")
    p.add_argument("--backbone", default=None, help=sized_help("", "backbone", GPU_SIZES, CPU_SIZES))
    p.add_argument("--height", type=int, default=None, help=sized_help("", "height", GPU_SIZES, CPU_SIZES))
    p.add_argument("--width", type=int, default=None, help=sized_help("", "width", GPU_SIZES, CPU_SIZES))
    p.add_argument("--P", type=int, default=None, help=sized_help("identities per batch", "P", GPU_SIZES, CPU_SIZES))
    p.add_argument("--K", type=int, default=None, help=sized_help("images per identity", "K", GPU_SIZES, CPU_SIZES))
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=None, help=sized_help("timed steps per mode", "steps", GPU_SIZES, CPU_SIZES))
    p.add_argument("--warmup", type=int, default=None, help=sized_help("untimed steps per mode, compilation happens here",
                                                                     "warmup", GPU_SIZES, CPU_SIZES))
    p.add_argument("--workers", type=int, default=None, help=sized_help("DataLoader workers for torch_loader", "workers",
                                                                      GPU_SIZES, CPU_SIZES))
    p.add_argument("--data", default="", help="dataset root for the end-to-end modes (default: a synthetic "
                   "Market-1501-layout set generated in a temporary folder)")
    p.add_argument("--classes", type=int, default=751, help="classifier width for the device-resident modes")
    p.add_argument("--capture", default="auto", choices=("auto", "cudagraphs", "reduce-overhead", "none"),
                   help="run.compile of the end-to-end modes dali and torch_loader: auto is the trainer's default "
                   "(reduce-overhead on a GPU, none on a CPU); none: eager (quick smoke runs)")
    add_out_argument(p)
    p.add_argument("--no-plot", action="store_true")
    return p


def bench_config(args, loader: str, root: str, penalty: str):
    """The Config of a benchmark run from its size arguments (random init, no evaluation)."""
    return load_config(None, [
        f"data.root={root}", f"data.loader={loader}", f"data.height={args.height}", f"data.width={args.width}",
        f"data.identities_per_batch={args.P}", f"data.images_per_identity={args.K}", f"data.num_workers={getattr(args, 'workers', 0)}",
        f"model.backbone={args.backbone}", "model.pretrained=none", f"regularizer.implementation={penalty}",
        f"run.precision={args.precision}", f"run.device={args.device}", "run.progress=false", "data.testing_size=0",
        "data.steps_per_epoch=100000",
    ])


def make_trainer(cfg, num_classes: int, device: torch.device, penalty: bool, compile_mode: str) -> Trainer:
    """A seeded task (channels_last on a GPU) in training mode and its Trainer."""
    from alr_fast.task import build_task

    torch.manual_seed(0)
    task = build_task(cfg, num_classes).to(device)
    if not penalty:
        task.regularizer = None
    channels_last = device.type == "cuda"
    if channels_last:
        task.model.to(memory_format=torch.channels_last)
    task.train()
    trainer = Trainer(task, build_optimizer(task, cfg.optim, device), device=device,
                      precision=resolve_precision(cfg.run.precision, device), compile_mode=compile_mode)
    return trainer


def resident_batch(args, device: torch.device, dtype: torch.dtype, channels_last: bool, seed: int = 0):
    """One P x K batch on the device, in the dtype and layout the loaders hand over."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(args.P * args.K, 3, args.height, args.width, generator=g).to(device, dtype)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(args.P).repeat_interleave(args.K).to(device)
    return images, labels, torch.zeros_like(labels)


def loader_steps(loader):
    """An endless stream of batches over epochs."""
    while True:
        yield from loader


def _release(device: torch.device) -> None:
    """Drop the previous mode's model, compiled graphs and CUDA-graph pool, so that each mode's
    peak memory is its own."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def mode_compile(mode: str, capture: str, device: torch.device) -> str:
    """run.compile of ``mode``'s step: its own for the captured modes, --capture for the end-to-end ones."""
    from alr_fast.trainer import resolve_compile

    if mode not in COMPILE_OF_MODE:
        return "none"
    return COMPILE_OF_MODE[mode] or resolve_compile(capture, device)


def run_mode(mode: str, args, device: torch.device, data_root: str) -> dict:
    _release(device)
    compile_mode = mode_compile(mode, args.capture, device)
    penalty = "reference" if mode == "eager_reference" else "fused"
    dtype = input_dtype(resolve_precision(args.precision, device), device)
    if mode in ("dali", "torch_loader"):
        from alr_fast.data import build_data

        cfg = bench_config(args, "dali" if mode == "dali" else "torch", data_root, penalty)
        data = build_data(cfg, device=device, dtype=dtype, channels_last=device.type == "cuda", progress=False)
        trainer = make_trainer(cfg, data.num_classes, device, True, compile_mode)
        stream = loader_steps(data.train_loader)

        def step():
            return trainer.train_step(next(stream))
    else:
        cfg = bench_config(args, "torch", data_root or ".", penalty)
        trainer = make_trainer(cfg, args.classes, device, mode != "eager_no_penalty", compile_mode)
        batch = resident_batch(args, device, dtype, device.type == "cuda")

        def step():
            return trainer.train_step(batch)
    stats = time_steps(step, device, args.steps, args.warmup, progress=f"  {mode}" if device.type != "cuda" else None)
    stats["images_per_s"] = args.steps * args.P * args.K / stats["total_s"]
    stats["compile_mode"] = compile_mode
    stats["input_dtype"] = str(dtype).removeprefix("torch.")
    stats["penalty"] = penalty if mode != "eager_no_penalty" else None
    stats["regularized_tensors"] = len(trainer.task.regularizer) if trainer.task.regularizer is not None else 0
    if device.type == "cuda":
        stats["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return stats


def ratios(results: dict) -> dict:
    ips = {m: r["images_per_s"] for m, r in results.items()}
    out = {}

    def ratio(name, a, b):
        if a in ips and b in ips:
            out[name] = ips[a] / ips[b]

    ratio("c_dali_over_b_captured", "dali", "captured")
    ratio("c_dali_over_a_eager_reference", "dali", "eager_reference")
    ratio("d_torch_loader_over_b_captured", "torch_loader", "captured")
    ratio("a_fused_over_a_reference", "eager_fused", "eager_reference")
    ratio("b_captured_over_a_fused", "captured", "eager_fused")
    ratio("b_cudagraphs_over_a_fused", "captured_cudagraphs", "eager_fused")
    ratio("b_captured_over_b_cudagraphs", "captured", "captured_cudagraphs")
    if "eager_no_penalty" in results and "eager_fused" in results:
        t0, t1 = results["eager_no_penalty"]["mean_s"], results["eager_fused"]["mean_s"]
        out["fused_penalty_fraction_of_eager_step"] = (t1 - t0) / t1
    if "eager_no_penalty" in results and "eager_reference" in results:
        t0, t1 = results["eager_no_penalty"]["mean_s"], results["eager_reference"]["mean_s"]
        out["reference_penalty_fraction_of_eager_step"] = (t1 - t0) / t1
    return out


def choose_modes(text: str | None, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """(modes to run, {mode: why it is skipped}); an unknown mode raises SystemExit(2)."""
    if text is None:
        skipped = {} if device.type == "cuda" else dict(CPU_SKIPPED)
        return [m for m in MODES if m not in skipped], skipped
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        print(f"alr-fast bench train: unknown mode(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(MODES)}",
              file=sys.stderr)
        raise SystemExit(2)
    return modes, {}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    try:
        modes, skipped = choose_modes(args.modes, device)
    except SystemExit as exc:
        return int(exc.code)
    apply_sized_defaults(args, device, GPU_SIZES, CPU_SIZES, "bench train")
    env = environment(device)
    results: dict = {m: {"skipped": why} for m, why in skipped.items()}
    for mode, why in skipped.items():
        print(f"bench train: {mode} skipped: {why}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        data_root = args.data
        if not data_root and any(m in ("dali", "torch_loader") for m in modes):
            from alr_fast.synthetic import make_synthetic

            data_root = tmp
            print("bench train: writing a synthetic Market-1501-layout set for the end-to-end modes ...", file=sys.stderr)
            make_synthetic(tmp, "market1501", num_train_ids=max(2 * args.P, 32), num_test_ids=4, seed=0)
        for mode in modes:
            print(f"bench train: {mode} (run.compile={mode_compile(mode, args.capture, device)}) ...", file=sys.stderr,
                  flush=True)
            try:
                results[mode] = run_mode(mode, args, device, data_root)
            except ImportError as exc:  # e.g. DALI not installed: the other modes still count
                results[mode] = {"skipped": str(exc)}
                print(f"bench train: {mode} skipped: {exc}", file=sys.stderr)
                continue
            r = results[mode]
            print(f"  {r['images_per_s']:,.1f} images/s, p50 {1e3 * r['p50_s']:.2f} ms, p99 {1e3 * r['p99_s']:.2f} ms, "
                  f"warm-up {r['warmup_s']:.1f} s", file=sys.stderr)
    timed = {m: r for m, r in results.items() if "images_per_s" in r}
    payload = {"kind": "train", "environment": env, "args": vars(args), "results": results, "ratios": ratios(timed)}
    path = write_result(result_path(Path(args.out), "train", env), payload)
    if not args.no_plot and timed:
        bar_plot(path.with_suffix(".png"), list(timed), [r["images_per_s"] for r in timed.values()], "images/s",
                 f"training step, {args.backbone} P{args.P}xK{args.K} {args.height}x{args.width} on {env['device_name']}")
    for k, v in payload["ratios"].items():
        print(f"  {k}: {v:.3f}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
