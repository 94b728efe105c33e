"""CUDA-graph capture check of the training step (``alr-fast bench capture``).

The real task (three-branch ResNet-50, adaptive L2, P16 x K4 at 384x128, bf16 on a GPU) is
trained for a few steps eagerly and under each capture mode (``run.compile=cudagraphs`` by
default, ``reduce-overhead`` on request), from the same seeded weights on the same batches (a
different batch every step, so that a graph replaying stale inputs would show), first with the
backbone frozen (phase A) and then unfrozen (phase B, which the Trainer recompiles). It reports:

- dynamo's graph count and graph breaks: one graph per phase is what the Trainer expects;
- ``cudagraph_skips``: graphs the CUDA-graph backend refused to capture (0 on a GPU; on a CPU
  every graph is skipped, "due to cpu device", and the step runs the compiled graphs uncaptured);
- the losses of every step, captured against eager, and their largest relative difference;
- warm-up time (compilation and recording) and the steady step time of each mode.

It writes ``capture-<device>-<date>.json`` and exits 1 on a GPU when a graph was skipped, a loss is
not finite, or the step-0 losses differ by more than the precision's tolerance. Without flags on a
CPU it runs a ResNet-18 at 64x32 and says so.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from alr_fast.bench.common import (
    add_out_argument, apply_sized_defaults, environment, result_path, sized_help, synchronize, write_result,
)
from alr_fast.bench.train import bench_config, make_trainer, resident_batch
from alr_fast.trainer import input_dtype, resolve_device, resolve_precision

GPU_SIZES = dict(backbone="resnet50", height=384, width=128, P=16, K=4, classes=751)
CPU_SIZES = dict(backbone="resnet18", height=64, width=32, P=2, K=2, classes=8)
# largest relative difference of a step-0 loss, captured against eager: the same kernels in a
# different launch order (fp32), or bf16 activations whose rounding the graph reorders
STEP0_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alr-fast bench capture", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="cudagraphs", help="comma list of capture modes to check against eager: "
                   "cudagraphs, reduce-overhead, default, max-autotune (default: cudagraphs, which compiles in seconds)")
    p.add_argument("--backbone", default=None, help=sized_help("", "backbone", GPU_SIZES, CPU_SIZES))
    p.add_argument("--height", type=int, default=None, help=sized_help("", "height", GPU_SIZES, CPU_SIZES))
    p.add_argument("--width", type=int, default=None, help=sized_help("", "width", GPU_SIZES, CPU_SIZES))
    p.add_argument("--P", type=int, default=None, help=sized_help("identities per batch", "P", GPU_SIZES, CPU_SIZES))
    p.add_argument("--K", type=int, default=None, help=sized_help("images per identity", "K", GPU_SIZES, CPU_SIZES))
    p.add_argument("--classes", type=int, default=None, help=sized_help("classifier width", "classes", GPU_SIZES, CPU_SIZES))
    p.add_argument("--steps-per-phase", type=int, default=3, help="steps with the backbone frozen, then as many unfrozen")
    p.add_argument("--timed-steps", type=int, default=5, help="further phase-B steps timed after the check")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--device", default="auto")
    add_out_argument(p)
    return p


def _counters() -> dict:
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "graph_break_reasons": sorted(counters["graph_break"])[:10],
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
    }


def run_mode(compile_mode: str, args, device: torch.device) -> dict:
    """Losses of every step (phase A then phase B), dynamo counters and step times of one mode."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cfg = bench_config(args, "torch", ".", "fused")
    trainer = make_trainer(cfg, args.classes, device, True, compile_mode)
    dtype = input_dtype(trainer.precision, device)
    batches = [resident_batch(args, device, dtype, device.type == "cuda", seed=s)
               for s in range(2 * args.steps_per_phase)]
    losses, step_s = [], []
    for i, batch in enumerate(batches):
        if i in (0, args.steps_per_phase):
            trainer.set_backbone_frozen(i == 0)  # phase A, then B: the Trainer compiles the step anew
        t0 = time.perf_counter()
        out = trainer.train_step(batch)
        losses.append({k: float(v) for k, v in out.items()})  # a deliberate sync per step: this is a check
        step_s.append(time.perf_counter() - t0)
    record = {"compile_mode": trainer.compile_mode, "losses": losses, "step_s": step_s, **_counters()}
    timed = resident_batch(args, device, dtype, device.type == "cuda", seed=1000)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.timed_steps):
        trainer.train_step(timed)
    synchronize(device)
    record["steady_step_s"] = (time.perf_counter() - t0) / max(args.timed_steps, 1)
    record["first_steps_s"] = [step_s[0], step_s[args.steps_per_phase]]  # compilation + recording per phase
    if device.type == "cuda":
        record["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    del trainer
    torch._dynamo.reset()
    return record


def compare(captured: list[dict], eager: list[dict]) -> dict:
    """Largest relative difference per loss term at step 0 and over all steps, and finiteness."""
    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(b), 1e-12)

    keys = list(eager[0])
    return {
        "step0_max_rel": max(rel(captured[0][k], eager[0][k]) for k in keys),
        "all_steps_total_max_rel": max(rel(c["total"], e["total"]) for c, e in zip(captured, eager)),
        "finite": all(math.isfinite(v) for step in captured for v in step.values()),
    }


def verdict(result: dict, eager: dict, precision: str, device: torch.device) -> list[str]:
    """What failed, empty when the mode passes (a CPU is only expected to run the graphs)."""
    problems = []
    if not result["finite"]:
        problems.append("a captured loss is not finite")
    if device.type == "cuda":
        if result["cudagraph_skips"]:
            problems.append(f"{result['cudagraph_skips']} graph(s) not captured in CUDA graphs")
        if result["step0_max_rel"] > STEP0_TOLERANCE[precision]:
            problems.append(f"step-0 losses differ by {result['step0_max_rel']:.2e} > {STEP0_TOLERANCE[precision]:.0e}")
    if result["unique_graphs"] > 2 or result["graph_breaks"]:
        problems.append(f"{result['unique_graphs']} dynamo graphs and {result['graph_breaks']} breaks (expected one "
                        f"graph per phase): {result['graph_break_reasons']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    apply_sized_defaults(args, device, GPU_SIZES, CPU_SIZES, "bench capture")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    allowed = ("cudagraphs", "reduce-overhead", "default", "max-autotune")
    if not modes or any(m not in allowed for m in modes) or args.steps_per_phase < 1:
        print(f"alr-fast bench capture: --modes takes a comma list of {', '.join(allowed)}; --steps-per-phase >= 1",
              file=sys.stderr)
        return 2
    precision = resolve_precision(args.precision, device)
    env = environment(device)
    print(f"bench capture: {args.backbone} P{args.P}xK{args.K} {args.height}x{args.width} {precision} on "
          f"{env['device_name']}: eager ...", file=sys.stderr, flush=True)
    eager = run_mode("none", args, device)
    results, failed = {}, False
    for mode in modes:
        print(f"bench capture: run.compile={mode} ...", file=sys.stderr, flush=True)
        r = run_mode(mode, args, device)
        r.update(compare(r["losses"], eager["losses"]))
        r["problems"] = verdict(r, eager, precision, device)
        failed |= bool(r["problems"])
        results[mode] = r
        print(f"  dynamo graphs {r['unique_graphs']}, graph breaks {r['graph_breaks']}, cudagraph_skips "
              f"{r['cudagraph_skips']}; step-0 losses max rel diff {r['step0_max_rel']:.2e}, total over "
              f"{len(r['losses'])} steps {r['all_steps_total_max_rel']:.2e}; first steps "
              f"{', '.join(f'{t:.1f}' for t in r['first_steps_s'])} s, steady step {1e3 * r['steady_step_s']:.1f} ms "
              f"(eager {1e3 * eager['steady_step_s']:.1f} ms)", file=sys.stderr)
        for i, (c, e) in enumerate(zip(r["losses"], eager["losses"])):
            print(f"    step {i} ({'A' if i < args.steps_per_phase else 'B'}): total captured {c['total']:.6f} "
                  f"eager {e['total']:.6f}", file=sys.stderr)
        for problem in r["problems"]:
            print(f"  FAILED: {problem}", file=sys.stderr)
    payload = {"kind": "capture", "environment": env, "args": vars(args), "precision": precision,
               "step0_tolerance": STEP0_TOLERANCE[precision], "eager": eager, "results": results,
               "passed": not failed}
    path = write_result(result_path(Path(args.out), "capture", env), payload)
    print(path)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
