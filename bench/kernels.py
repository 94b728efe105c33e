"""Benchmark of the evaluation kernels: CuPy on one GPU against the NumPy reference.

``python -m alr_fast.bench.kernels`` (and ``alr-fast bench kernels``). For each scale
(Market-1501: 3,368 x 15,913; MSMT17: 11,659 x 82,161; 4096-d features as the model's, docs/METHOD.md §2.5) it draws
random structured features on the device (identities x cameras, pid-0 distractors), then:

1. validates every GPU kernel against the NumPy reference on a subset (stated in the output),
2. times the GPU kernels at full size (median of ``--repeat`` runs, CUDA events, after a
   warm-up that compiles the kernels) and the reference on the subset; where the reference is
   too slow for the full size its full-size time is extrapolated (rule stated per row),
3. reports achieved TFLOP/s (distances) or GB/s (ranking) against peaks measured on the same
   GPU (a cuBLAS GEMM per dtype and a device-to-device copy), and the peak device memory of
   each call (CuPy memory pool high-water mark, inputs included and beyond them),
4. writes ``kernels-<device>-<date>.json`` (device, versions, peaks, rows, targets) and a PNG.

Without a usable GPU it says so and times just the NumPy reference at CPU sizes (the smoke and
Market scales; ``--reference-only`` asks for that on any machine).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from alr_fast.bench.common import add_out_argument, json_value, result_path
from alr_fast.kernels import gpu, reference

TARGETS_S = {  # issue targets on one H100
    ("market", "evaluation"): 0.020,
    ("msmt17", "evaluation"): 0.300,
    ("market", "rerank"): 0.5,
    ("msmt17", "rerank"): 5.0,
}


@dataclasses.dataclass(frozen=True)
class Scale:
    name: str
    num_query: int
    num_gallery: int
    num_ids: int
    num_cams: int


SCALES = {
    "market": Scale("market", 3368, 15913, 750, 6),
    "msmt17": Scale("msmt17", 11659, 82161, 3060, 15),
    "smoke": Scale("smoke", 60, 300, 20, 4),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alr-fast bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--scales", default=None, help="comma list of: " + ", ".join(SCALES) + " (default market,msmt17 "
                   "on a GPU; smoke,market of the reference alone on a CPU)")
    p.add_argument("--dim", type=int, default=4096, help="feature dimension (default 4096)")
    p.add_argument("--repeat", type=int, default=5, help="timed GPU runs per kernel (median)")
    p.add_argument("--ref-queries", type=int, default=128, help="query rows of the reference subset")
    p.add_argument("--ref-rerank", default="300x1500", help="QxG of the re-ranking reference subset")
    p.add_argument("--no-rerank", action="store_true", help="skip re-ranking")
    p.add_argument("--reference-only", action="store_true", help="time only the NumPy reference (CPU); the "
                   "default without a usable GPU")
    add_out_argument(p)
    p.add_argument("--seed", type=int, default=0)
    return p


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def make_split(xp, scale: Scale, dim: int, seed: int):
    """Clipped non-negative features (as the model's clipped GAP vectors) of scale.num_ids
    identities under scale.num_cams cameras; ~10% pid-0 distractors in the gallery.

    Returns (qf float32 [Q, D], gf float32 [G, D], q_pids, g_pids, q_cams, g_cams) in ``xp``.
    """
    rs = xp.random.RandomState(seed)
    centres = rs.uniform(0.0, 1.0, (scale.num_ids + 1, dim)).astype(np.float32)
    cam_shift = (0.15 * rs.standard_normal((scale.num_cams, dim))).astype(np.float32)
    q_pids = rs.randint(1, scale.num_ids + 1, scale.num_query)
    g_pids = rs.randint(1, scale.num_ids + 1, scale.num_gallery)
    g_pids[rs.uniform(size=scale.num_gallery) < 0.1] = 0
    q_cams, g_cams = rs.randint(0, scale.num_cams, scale.num_query), rs.randint(0, scale.num_cams, scale.num_gallery)

    def draw(pids, cams):
        out = xp.empty((len(pids), dim), dtype=np.float32)
        for s in range(0, len(pids), 8192):  # bounded temporaries
            p, c = pids[s:s + 8192], cams[s:s + 8192]
            noise = (0.35 * rs.standard_normal((len(p), dim))).astype(np.float32)
            out[s:s + 8192] = xp.clip(centres[p] + cam_shift[c] + noise, 0.0, 1.0)
        return out

    return draw(q_pids, q_cams), draw(g_pids, g_cams), q_pids, g_pids, q_cams, g_cams


# --------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------
def time_host(fn, repeat: int = 1) -> float:
    """Median wall time (s) of ``fn()`` on the host."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_device(cp, fn, repeat: int) -> float:
    """Median device time (s) of ``fn()`` between CUDA events, after one warm-up call."""
    fn()  # compiles kernels, fills the memory pool
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(max(1, repeat)):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return float(np.median(times))


def peak_memory(cp, fn) -> tuple[int, int]:
    """(peak bytes in use in CuPy's pool during ``fn()``, of which beyond what was in use before)."""

    class PeakHook(cp.cuda.MemoryHook):
        name = "PeakHook"

        def __init__(self, used: int):
            self.used = self.peak = used

        def malloc_postprocess(self, **kw):
            self.used += kw["mem_size"]
            self.peak = max(self.peak, self.used)

        def free_postprocess(self, **kw):
            self.used -= kw["mem_size"]

    cp.cuda.Device().synchronize()
    before = cp.get_default_memory_pool().used_bytes()
    hook = PeakHook(before)
    with hook:
        fn()
    cp.cuda.Device().synchronize()
    return int(hook.peak), int(hook.peak - before)


def measure_peaks(cp, gemm=None, size: int = 8192, copy_bytes: int = 1 << 30, repeat: int = 5) -> dict:
    """Measured peaks of this GPU: cuBLAS GEMM TFLOP/s per dtype (the GEMM compute_distmat
    calls, ``gemm(a, b, out)``), device-to-device copy GB/s."""
    gemm = gemm or gpu._cupy_gemm_f32
    out = {}
    for dtype in (np.float16, np.float32):
        a = cp.random.standard_normal((size, size), dtype=np.float32).astype(dtype)
        c = cp.empty((size, size), dtype=np.float32)
        t = time_device(cp, lambda: gemm(a, a, c), repeat)
        out[f"gemm_{np.dtype(dtype).name}_tflops"] = 2.0 * size ** 3 / t / 1e12
        del a, c
    src = cp.ones(copy_bytes // 4, dtype=np.float32)
    dst = cp.empty_like(src)
    t = time_device(cp, lambda: dst.__setitem__(Ellipsis, src), repeat)
    out["copy_gbps"] = 2.0 * src.nbytes / t / 1e9  # read + write
    out["gemm_shape"], out["copy_bytes"] = [size, size, size], int(src.nbytes)
    return out


# --------------------------------------------------------------------------------------------
# Per-scale benchmarks
# --------------------------------------------------------------------------------------------
def _row(scale: Scale, kernel: str, **fields) -> dict:
    return {"scale": scale.name, "kernel": kernel, "shape": [scale.num_query, scale.num_gallery], **fields}


def bench_reference(split_host, scale: Scale, args) -> list[dict]:
    """Reference timings on the subsets (and their linear / quadratic extrapolations)."""
    qf, gf, q_pids, g_pids, q_cams, g_cams = split_host
    nq = min(args.ref_queries, scale.num_query)
    rows = []
    t = time_host(lambda: reference.compute_distmat(qf[:nq], gf))
    rows.append(_row(scale, "distmat", ref_s=t, ref_subset=f"{nq} queries x {scale.num_gallery}",
                     ref_extrapolated_s=t * scale.num_query / nq, ref_extrapolation="linear in Q"))
    distmat = reference.compute_distmat(qf[:nq], gf)
    t = time_host(lambda: reference.evaluate_ranking(distmat, q_pids[:nq], g_pids, q_cams[:nq], g_cams))
    rows.append(_row(scale, "ranking", ref_s=t, ref_subset=f"{nq} queries x {scale.num_gallery}",
                     ref_extrapolated_s=t * scale.num_query / nq, ref_extrapolation="linear in Q"))
    if not args.no_rerank:
        rq, rg = _rerank_subset(scale, args)
        inputs = _rerank_inputs_host(qf, gf, rq, rg)
        t = time_host(lambda: reference.rerank_k_reciprocal(*inputs))
        n_full, n_sub = scale.num_query + scale.num_gallery, rq + rg
        rows.append(_row(scale, "rerank", ref_s=t, ref_subset=f"{rq} x {rg}",
                         ref_extrapolated_s=t * (n_full / n_sub) ** 2, ref_extrapolation="quadratic in Q + G"))
    return rows


def _rerank_subset(scale: Scale, args) -> tuple[int, int]:
    rq, rg = (int(v) for v in args.ref_rerank.lower().split("x"))
    return min(rq, scale.num_query), min(rg, scale.num_gallery)


def _rerank_inputs_host(qf, gf, rq: int, rg: int):
    q, g = qf[:rq], gf[:rg]
    return reference.compute_distmat(q, g), reference.compute_distmat(q, q), reference.compute_distmat(g, g)


def bench_gpu(cp, split, scale: Scale, args, peaks: dict, backend: gpu.Backend | None = None) -> list[dict]:
    """Validate on the subsets, then time the GPU kernels at full size (``backend``: tests)."""
    qf, gf, q_pids, g_pids, q_cams, g_cams = split
    host = [cp.asnumpy(x) for x in split]
    nq = min(args.ref_queries, scale.num_query)
    flops = 2.0 * scale.num_query * scale.num_gallery * args.dim
    rows = []
    for dtype in (np.float16, np.float32):
        q, g = qf.astype(dtype), gf.astype(dtype)
        err = float(np.abs(cp.asnumpy(gpu.compute_distmat(q[:nq], g, backend=backend)) -
                           reference.compute_distmat(host[0][:nq].astype(dtype), host[1].astype(dtype))).max())
        t = time_device(cp, lambda: gpu.compute_distmat(q, g, backend=backend), args.repeat)
        mem = peak_memory(cp, lambda: gpu.compute_distmat(q, g, backend=backend))
        tflops = flops / t / 1e12
        rows.append(_row(scale, "distmat", dtype=np.dtype(dtype).name, gpu_s=t, tflops=tflops,
                         peak_fraction=tflops / peaks[f"gemm_{np.dtype(dtype).name}_tflops"],
                         peak_mem_bytes=mem[0], peak_mem_extra_bytes=mem[1], max_abs_err=err))
        del q, g

    distmat = gpu.compute_distmat(qf, gf, backend=backend)
    labels = (q_pids, g_pids, q_cams, g_cams)
    got = gpu.evaluate_ranking(distmat[:nq], q_pids[:nq], g_pids, q_cams[:nq], g_cams, backend=backend)
    want = reference.evaluate_ranking(cp.asnumpy(distmat[:nq]), host[2][:nq], host[3], host[4][:nq], host[5])
    exact = bool(np.array_equal(got[0], want[0]) and abs(got[1] - want[1]) < 1e-9)
    t = time_device(cp, lambda: gpu.evaluate_ranking(distmat, *labels, backend=backend), args.repeat)
    mem = peak_memory(cp, lambda: gpu.evaluate_ranking(distmat, *labels, backend=backend))
    gbps = (distmat.nbytes + 4 * scale.num_gallery) / t / 1e9
    rows.append(_row(scale, "ranking", dtype="float32", gpu_s=t, gbps=gbps, peak_fraction=gbps / peaks["copy_gbps"],
                     peak_mem_bytes=mem[0], peak_mem_extra_bytes=mem[1], matches_reference=exact))
    del distmat

    t = time_device(cp, lambda: gpu.evaluate_ranking(gpu.compute_distmat(qf, gf, backend=backend), *labels,
                                                     backend=backend), args.repeat)
    rows.append(_row(scale, "evaluation", dtype="float32", gpu_s=t, note="compute_distmat + evaluate_ranking",
                     target_s=TARGETS_S.get((scale.name, "evaluation"))))
    if not args.no_rerank:
        rows.append(_bench_gpu_rerank(cp, split, host, scale, args, backend))
    return rows


def _bench_gpu_rerank(cp, split, host, scale: Scale, args, backend) -> dict:
    qf, gf = split[:2]
    rq, rg = _rerank_subset(scale, args)
    sub_host = _rerank_inputs_host(host[0], host[1], rq, rg)
    sub_dev = [cp.asarray(x) for x in sub_host]
    got = cp.asnumpy(gpu.rerank_k_reciprocal(*sub_dev, backend=backend))
    err = float(np.abs(got - reference.rerank_k_reciprocal(*sub_host)).max())
    del sub_dev
    q16, g16 = qf.astype(np.float16), gf.astype(np.float16)
    inputs = tuple(gpu.compute_distmat(a, b, backend=backend) for a, b in ((q16, g16), (q16, q16), (g16, g16)))
    del q16, g16
    t = time_device(cp, lambda: gpu.rerank_k_reciprocal(*inputs, backend=backend), min(args.repeat, 3))
    mem = peak_memory(cp, lambda: gpu.rerank_k_reciprocal(*inputs, backend=backend))
    return _row(scale, "rerank", dtype="float32", gpu_s=t, peak_mem_bytes=mem[0], peak_mem_extra_bytes=mem[1],
                input_bytes=int(sum(x.nbytes for x in inputs)), max_abs_err=err,
                err_subset=f"{rq} x {rg}", target_s=TARGETS_S.get((scale.name, "rerank")))


def merge_rows(gpu_rows: list[dict], ref_rows: list[dict]) -> list[dict]:
    """Attach each reference row to the GPU rows of the same (scale, kernel) and add speed-ups."""
    ref = {(r["scale"], r["kernel"]): r for r in ref_rows}
    out = []
    for row in gpu_rows:
        r = ref.get((row["scale"], row["kernel"]), {})
        row = {**row, **{k: v for k, v in r.items() if k.startswith("ref_")}}
        if "ref_extrapolated_s" in row:
            row["speedup_vs_reference"] = row["ref_extrapolated_s"] / row["gpu_s"]
        if row.get("target_s"):
            row["meets_target"] = row["gpu_s"] < row["target_s"]
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------
# Environment, output
# --------------------------------------------------------------------------------------------
def gpu_status() -> tuple[object | None, str]:
    """(cupy, "") when a CUDA device can allocate, else (None, the reason)."""
    try:
        import cupy as cp
    except ImportError:
        return None, "CuPy is not installed (pip install 'alr-fast[cupy]')"
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            return None, "no CUDA device found"
        cp.zeros(1)
    except Exception as exc:  # driver missing, no device, ...
        return None, f"no usable CUDA device ({type(exc).__name__}: {exc})"
    return cp, ""


def environment(cp) -> dict:
    import torch

    env = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
           "host": platform.node(), "cpu_count": __import__("os").cpu_count()}
    if cp is None:
        return {"device": "cpu", "versions": env}
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    env.update(cupy=cp.__version__, cuda_runtime=cp.cuda.runtime.runtimeGetVersion(),
               cuda_driver=cp.cuda.runtime.driverGetVersion(), nvrtc=".".join(map(str, cp.cuda.nvrtc.getVersion())))
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return {"device": name, "compute_capability": f"{props['major']}.{props['minor']}",
            "total_memory_bytes": int(props["totalGlobalMem"]), "versions": env}


def write_results(report: dict, out_dir: Path) -> tuple[Path, Path]:
    json_path = result_path(Path(out_dir), "kernels", {"device_name": report["device"]})
    json_path.parent.mkdir(parents=True, exist_ok=True)
    png_path = json_path.with_suffix(".png")
    json_path.write_text(json.dumps(json_value(report), indent=2) + "\n", encoding="utf-8")
    plot_results(report, png_path)
    return json_path, png_path


def plot_results(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    labels = [f"{r['scale']}\n{r['kernel']}" + (f"\n{r['dtype']}" if r.get("dtype") else "") for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4.5))
    ref = [r.get("ref_extrapolated_s", np.nan) for r in rows]
    ax.bar(x - 0.2, ref, 0.4, label="NumPy reference (full size, extrapolated from the subset)",
           color="#bbbbbb", hatch="//")
    if any("gpu_s" in r for r in rows):
        ax.bar(x + 0.2, [r.get("gpu_s", np.nan) for r in rows], 0.4, label=f"GPU ({report['device']})",
               color="#3b7dd8")
    for i, r in enumerate(rows):
        if r.get("target_s"):
            ax.hlines(r["target_s"], i - 0.45, i + 0.45, colors="#d62728", linestyles="--")
    ax.set_yscale("log")
    ax.set_ylabel("seconds (log)")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_title("alr-fast evaluation kernels (red dashes: targets)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cp, reason = (None, "") if args.reference_only else gpu_status()
    if cp is None and not args.reference_only:
        print(f"bench kernels: no usable GPU ({reason}): timing the NumPy reference alone, at CPU sizes unless "
              "--scales is given", file=sys.stderr)
        args.reference_only = True
    if args.scales is None:
        args.scales = "smoke,market" if cp is None else "market,msmt17"
    unknown = [s for s in args.scales.split(",") if s and s not in SCALES]
    if unknown:
        print(f"bench kernels: unknown scale(s) {', '.join(unknown)}; choose from {', '.join(SCALES)}", file=sys.stderr)
        return 2
    scales = [SCALES[s] for s in args.scales.split(",") if s]
    report = {**environment(cp), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "args": vars(args),
              "targets_s": {f"{a}/{b}": v for (a, b), v in TARGETS_S.items()}}
    if cp is not None:
        report["peaks"] = measure_peaks(cp)
    results = []
    for scale in scales:
        print(f"bench kernels: {scale.name} ({scale.num_query} x {scale.num_gallery}) ...", file=sys.stderr, flush=True)
        if cp is None:
            split_host = make_split(np, scale, args.dim, args.seed)
            results += bench_reference(split_host, scale, args)
            continue
        split = make_split(cp, scale, args.dim, args.seed)
        gpu_rows = bench_gpu(cp, split, scale, args, report["peaks"])
        ref_rows = bench_reference([cp.asnumpy(x) for x in split], scale, args)
        results += merge_rows(gpu_rows, ref_rows)
        del split
        cp.get_default_memory_pool().free_all_blocks()
    report["results"] = results
    json_path, png_path = write_results(report, args.out)
    for r in results:
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items() if k not in ("shape",)}
        print(json.dumps(shown))
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
