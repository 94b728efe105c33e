"""End-to-end evaluation benchmark (``alr-fast bench eval``): one full evaluation, fast path vs reference.

  fast       the evaluation cache (decoded once; its build is reported as a one-time cost), the
             extraction at eval.precision with the image and its flip in one batch (captured in a
             CUDA graph on a GPU), then the kernels: CuPy on a GPU; on a CPU the float32 BLAS
             distances and the sort-free ranking
  reference  the plain path: the JPEG loader (decode every time), eager extraction in fp32, the
             features copied to the host and the NumPy reference kernels (float64 distances, a
             sorted ranking, the dense re-ranking)

in one run, on synthetic JPEGs at a dataset's real counts (Market-1501: 3,368 query / 15,913
gallery; MSMT17: 11,659 / 82,161) times ``--scale``, with a breakdown (cache build, extraction
images/s, distance, CMC/mAP, re-ranking), the ratio reference / fast, peak device and host memory,
and two accuracy studies: the mAP of bf16 (and fp16) extraction against fp32 (``--precision`` is
the timed one), and the re-ranked mAP with the tensor-core GEMM options (tf32, bf16) of the
re-ranking-only q-q / g-g matrices against float32 (on a CPU their rounding is emulated, host.py: the ranking effect is measured,
their speed is a GPU matter). ``--features-only`` skips images and times the kernels on random
structured 4096-d features at the real counts (what the CPU target is about). Where the
reference would exceed ``--max-seconds`` it runs on a subset and is extrapolated (linear in the
images for extraction, in Q for distances and ranking, quadratic in Q + G for re-ranking; the rule
is written next to each figure). Writes ``eval-<device>-<date>.json`` (device, versions, every
figure a number) and a PNG into ``--out``.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from alr_fast.bench.common import (
    add_out_argument, environment, result_path, sized_help, stacked_bar_plot, synchronize, write_result,
)
from alr_fast.bench.synthetic_fast import REAL_COUNTS, eval_split
from alr_fast.evaluation import (
    FeatureExtractor, FeatureSet, auto_batch_size, eval_input_dtype, evaluate_features,
)
from alr_fast.kernels import reference
from alr_fast.trainer import resolve_device

CPU_DEFAULTS = dict(scale=0.01, backbone="resnet18", height=128, width=64)
GPU_DEFAULTS = dict(scale=1.0, backbone="resnet50", height=384, width=128)
TARGETS_S = {"market1501": 3.0, "msmt17": 15.0}  # issue 10 on one H200, full evaluation incl. extraction
# reference kernels at full size up to this many q-g distances (Market-1501: 5.4e7), else on a subset
REFERENCE_FULL_DISTANCES = 6e7


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alr-fast bench eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="market1501", choices=tuple(REAL_COUNTS), help="whose real counts to use")
    p.add_argument("--scale", type=float, default=None,
                   help=sized_help("fraction of the real counts", "scale", GPU_DEFAULTS, CPU_DEFAULTS))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backbone", default=None, help=sized_help("", "backbone", GPU_DEFAULTS, CPU_DEFAULTS))
    p.add_argument("--height", type=int, default=None, help=sized_help("", "height", GPU_DEFAULTS, CPU_DEFAULTS))
    p.add_argument("--width", type=int, default=None, help=sized_help("", "width", GPU_DEFAULTS, CPU_DEFAULTS))
    p.add_argument("--batch-size", type=int, default=0, help="eval.batch_size (0: auto)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="eval.precision of the timed fast path (fp32: the default, as the seed)")
    p.add_argument("--precisions", default="fp32,bf16", help="extraction precisions compared with the timed one")
    p.add_argument("--rerank-gemms", default="float32,tf32,bf16", help="re-ranking GEMM options to compare")
    p.add_argument("--no-re-ranking", action="store_true")
    p.add_argument("--no-reference", action="store_true", help="skip the reference path")
    p.add_argument("--features-only", action="store_true", help="no images: the kernels on random 4096-d features")
    p.add_argument("--dim", type=int, default=4096, help="feature dimension of --features-only")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers of the reference JPEG loader")
    p.add_argument("--max-seconds", type=float, default=120.0,
                   help="bound of the reference path's timed parts; beyond it they run on subsets, extrapolated")
    p.add_argument("--seed", type=int, default=0)
    add_out_argument(p)
    p.add_argument("--no-plot", action="store_true")
    return p


def _say(text: str) -> None:
    print(f"bench eval: {text}", file=sys.stderr, flush=True)


def _peak_host_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _defaults(args, device: torch.device) -> list[str]:
    """Fill unset sizes with the device's defaults; returns the names of those taken."""
    table = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    taken = []
    for key, value in table.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
            taken.append(f"{key}={value}")
    return taken


def _model(args, device: torch.device):
    from alr_fast.model import ReidNet

    torch.manual_seed(args.seed)
    net = ReidNet(10, args.backbone).to(device)
    if device.type == "cuda":
        net.to(memory_format=torch.channels_last)
    return net.eval()


def _timed(fn, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def _fast_path(args, device, net, data, precision: str) -> tuple[FeatureSet, FeatureSet, dict]:
    """(query, gallery, figures) of the cached, captured path at ``precision``."""
    from alr_fast.pipelines.eval_cache import CachedEvalLoader, EvalCachePlan, build_eval_cache, eval_cache_bytes

    q_store, q_pids, q_cams, g_store, g_pids, g_cams = data
    dtype = eval_input_dtype(precision, device)
    batch = auto_batch_size(args.batch_size, device, args.height, args.width, dtype)
    plan = EvalCachePlan("auto", 16 << 30, device)
    loaders, build_s, placements = [], 0.0, []
    for store, pids, cams in ((q_store, q_pids, q_cams), (g_store, g_pids, g_cams)):
        placement = plan.placement(eval_cache_bytes(len(store), args.height, args.width))
        placement = "host" if placement == "none" else placement  # the benchmark times the cache either way
        cache, t = _timed(lambda: build_eval_cache(store, args.height, args.width, placement=placement, device=device),
                          device)
        build_s += t
        placements.append(placement)
        loaders.append(CachedEvalLoader(cache, pids, cams, batch_size=batch, device=device, dtype=dtype,
                                        channels_last=device.type == "cuda"))
    extractor = FeatureExtractor(net, precision=precision)
    if device.type == "cuda":
        # cuDNN's algorithm search and lazy inits happen once per process, not per evaluation: done
        # on two batches first; the capture is timed, as every evaluation of a run captures anew
        head = CachedEvalLoader(loaders[0].cache[:2 * batch], q_pids[:2 * batch], q_cams[:2 * batch],
                                batch_size=batch, device=device, dtype=dtype, channels_last=True)
        FeatureExtractor(net, precision=precision)(head)
        torch.cuda.reset_peak_memory_stats(device)
    (q, g), t = _timed(lambda: [extractor(loader) for loader in loaders], device)
    figures = {"cache_build_s": build_s, "cache_placement": placements, "cache_bytes": sum(x.nbytes for x in loaders),
               "batch_size": batch, "extraction_s": t, "extraction_images_per_s": (len(q_pids) + len(g_pids)) / t,
               "capture": device.type == "cuda"}
    return q, g, figures


def _reference_extraction(args, device, net, data) -> tuple[FeatureSet, FeatureSet, dict]:
    """JPEG loader + eager fp32; on a subset with linear extrapolation when it would be too slow."""
    from alr_fast.pipelines.jpeg_store import JpegStore
    from alr_fast.pipelines.torch_loader import TorchEvalLoader

    q_store, q_pids, q_cams, g_store, g_pids, g_cams = data
    batch = 64  # the seed's test batch
    extractor = FeatureExtractor(net, precision="fp32", capture=False)
    sets, total_s, measured = [], 0.0, 0
    probe_store = JpegStore(g_store.paths[:batch * 2], g_store.data[:batch * 2])
    probe = TorchEvalLoader(probe_store, g_pids[:batch * 2], g_cams[:batch * 2], height=args.height, width=args.width,
                            batch_size=batch, num_workers=0, device=device)
    _, probe_s = _timed(lambda: extractor(probe), device)
    rate = len(probe_store) / probe_s
    budget_images = int(rate * args.max_seconds * 0.4)  # extraction's share of the reference budget
    for store, pids, cams in ((q_store, q_pids, q_cams), (g_store, g_pids, g_cams)):
        n = min(len(store), max(batch, budget_images // 2))
        sub = JpegStore(store.paths[:n], store.data[:n])
        loader = TorchEvalLoader(sub, pids[:n], cams[:n], height=args.height, width=args.width, batch_size=batch,
                                 num_workers=args.workers if device.type == "cuda" else 0, device=device)
        fs, t = _timed(lambda: extractor(loader), device)
        sets.append(fs)
        total_s += t * len(store) / n
        measured += n
    full = len(q_pids) + len(g_pids)
    figures = {"extraction_s": total_s, "extraction_images_per_s": full / total_s, "batch_size": batch,
               "extraction_measured_images": measured,
               "extraction_rule": "measured" if measured == full else f"{measured} of {full} images, linear"}
    return sets[0], sets[1], figures


def _head(fs: FeatureSet, rows: int) -> FeatureSet:
    return FeatureSet(fs.features[:rows], fs.pids[:rows], fs.camids[:rows])


def _host(fs: FeatureSet, rows: int | None = None) -> FeatureSet:
    n = len(fs.pids) if rows is None else rows
    return FeatureSet(torch.from_numpy(fs.features[:n].cpu().numpy()), fs.pids[:n], fs.camids[:n])


def _reference_kernels(args, q: FeatureSet, g: FeatureSet, re_ranking: bool) -> dict:
    """The NumPy reference (exact) on host copies; subsets with extrapolation beyond the size rule."""
    num_q, num_g = len(q.pids), len(g.pids)
    full = num_q * num_g <= REFERENCE_FULL_DISTANCES
    nq = num_q if full else max(1, int(REFERENCE_FULL_DISTANCES // num_g))
    times: dict = {}
    metrics = evaluate_features(_host(q, nq), _host(g), exact=True, re_ranking=False, stage_times=times)
    out = {"distance_s": times["distance"] * num_q / nq, "ranking_s": times["ranking"] * num_q / nq,
           "kernels_rule": "measured" if full else f"{nq} of {num_q} queries, linear in Q",
           "mAP": metrics["mAP"] if full else None}
    if re_ranking:
        scale = 1.0 if full else min(1.0, (REFERENCE_FULL_DISTANCES / (num_q * num_g)) ** 0.5)
        rq, rg = max(2, int(num_q * scale)), max(2, int(num_g * scale))
        qs, gs = _host(q, rq), _host(g, rg)
        start = time.perf_counter()
        qg = reference.compute_distmat(qs.features.numpy(), gs.features.numpy())
        qq = reference.compute_distmat(qs.features.numpy(), qs.features.numpy())
        gg = reference.compute_distmat(gs.features.numpy(), gs.features.numpy())
        rr = reference.rerank_k_reciprocal(qg, qq, gg)
        reference.evaluate_ranking(rr, qs.pids, gs.pids, qs.camids, gs.camids)
        t = time.perf_counter() - start - (times["distance"] if full else 0.0)  # q-g counted above
        out["re_ranking_s"] = t * ((num_q + num_g) / (rq + rg)) ** 2
        out["re_ranking_rule"] = "measured" if full else f"{rq} x {rg} subset, quadratic in Q + G"
    return out


def _accuracy_studies(args, device, net, data, q32: FeatureSet, g32: FeatureSet, fast_metrics: dict) -> dict:
    """mAP of each extraction precision vs fp32; re-ranked mAP of each re-ranking GEMM vs float32."""
    out: dict = {"precision": {}, "rerank_gemm": {}}
    base = fast_metrics
    timed = args.precision
    for precision in [p for p in args.precisions.split(",") if p and p != timed]:
        _say(f"extraction in {precision} (accuracy study) ...")
        q, g, fig = _fast_path(args, device, net, data, precision)
        m = evaluate_features(q, g, re_ranking=False)
        out["precision"][precision] = {"mAP": m["mAP"], "rank1": m["rank1"], f"mAP_minus_{timed}": m["mAP"] - base["mAP"],
                                       f"rank1_minus_{timed}": m["rank1"] - base["rank1"],
                                       "extraction_images_per_s": fig["extraction_images_per_s"],
                                       f"speedup_vs_{timed}": base["extraction_s"] / fig["extraction_s"]}
    if not args.no_re_ranking:
        for gemm in [x for x in args.rerank_gemms.split(",") if x]:
            _say(f"re-ranking with {gemm} q-q / g-g GEMMs (accuracy study) ...")
            times: dict = {}
            m = evaluate_features(q32, g32, re_ranking=True, rerank_gemm=gemm, stage_times=times)
            out["rerank_gemm"][gemm] = {"rr_mAP": m["rr_mAP"], "rr_rank1": m["rr_rank1"],
                                        "rr_mAP_minus_float32": m["rr_mAP"] - base["rr_mAP"],
                                        "rr_rank1_minus_float32": m["rr_rank1"] - base["rr_rank1"],
                                        "re_ranking_s": times["re_ranking"],
                                        "timing_meaningful": device.type == "cuda"}
    return out


def _features_only(args, device):
    """Random structured features at the real counts, on the device (--features-only)."""
    from alr_fast.bench.kernels import Scale, make_split

    c = REAL_COUNTS[args.dataset]
    scale = Scale(args.dataset, max(8, int(c["query"] * args.scale)), max(16, int(c["gallery"] * args.scale)),
                  max(4, int(c["test_ids"] * args.scale)), c["cameras"])
    qf, gf, qp, gp, qc, gc = make_split(np, scale, args.dim, args.seed)
    rng = np.random.default_rng(args.seed + 1)  # harder than make_split alone: mAP away from 1
    qf = np.clip(qf + 0.8 * rng.standard_normal(qf.shape, dtype=np.float32), 0, 1)
    gf = np.clip(gf + 0.8 * rng.standard_normal(gf.shape, dtype=np.float32), 0, 1)
    to = (lambda x: torch.from_numpy(x).to(device))
    return FeatureSet(to(qf), qp, qc), FeatureSet(to(gf), gp, gc)


def run(args) -> dict:
    device = resolve_device(args.device)
    taken = _defaults(args, device)
    if args.features_only:  # no model, no images: only the scale matters
        taken = [t for t in taken if t.startswith("scale")]
    if device.type != "cuda" and taken:
        _say(f"no GPU: CPU-sized defaults {', '.join(taken)} (pass --scale 1 and sizes for the full work)")
    c = REAL_COUNTS[args.dataset]
    num_q, num_g = max(8, int(round(c["query"] * args.scale))), max(16, int(round(c["gallery"] * args.scale)))
    result = {"kind": "eval", "environment": environment(device), "args": vars(args), "cpu_defaults": taken,
              "dataset": {"name": args.dataset, "scale": args.scale, "query": num_q, "gallery": num_g}}
    re_ranking = not args.no_re_ranking
    fast: dict = {}
    if args.features_only:
        q, g = _features_only(args, device)
        result["dataset"].update(query=len(q.pids), gallery=len(g.pids), features_only=True, dim=args.dim)
        net = data = None
    else:
        _say(f"synthetic {args.dataset} JPEGs: {num_q} query + {num_g} gallery ...")
        (data, gen_s) = _timed(lambda: eval_split(num_q, num_g, max(4, int(c["test_ids"] * args.scale)), c["cameras"],
                                                  seed=args.seed), torch.device("cpu"))
        result["dataset"]["generation_s"] = gen_s
        net = _model(args, device)
        _say(f"fast path: cache build + extraction ({args.backbone} {args.height}x{args.width}, {args.precision}) ...")
        q, g, fig = _fast_path(args, device, net, data, args.precision)
        fast.update(fig)
    if device.type == "cuda":  # CuPy compiles its kernels on first use (once per machine): not an evaluation's cost
        start = time.perf_counter()
        try:
            evaluate_features(_head(q, 64), _head(g, 2048), re_ranking=re_ranking)
        except ValueError:  # no match among the first queries: the kernels are compiled all the same
            pass
        synchronize(device)
        fast["kernel_warmup_s"] = time.perf_counter() - start
    _say("fast path: kernels ...")
    times: dict = {}
    metrics = evaluate_features(q, g, re_ranking=re_ranking, stage_times=times)
    fast.update({f"{k}_s": v for k, v in times.items()})
    fast["mAP"], fast["rank1"] = metrics["mAP"], metrics["rank1"]
    if re_ranking:
        fast["rr_mAP"], fast["rr_rank1"] = metrics["rr_mAP"], metrics["rr_rank1"]
    fast["evaluation_s"] = fast.get("extraction_s", 0.0) + sum(times.values())
    if device.type == "cuda":
        fast["peak_device_bytes"] = int(torch.cuda.max_memory_allocated(device))
    fast["peak_host_bytes"] = _peak_host_bytes()
    _say(f"fast: {fast['evaluation_s']:.2f} s per evaluation ({', '.join(f'{k} {v:.2f} s' for k, v in times.items())})")
    result["fast"] = fast

    if not args.no_reference:
        ref: dict = {}
        if not args.features_only:
            _say("reference path: JPEG loader + eager fp32 extraction ...")
            ref.update(_reference_extraction(args, device, net, data)[2])
        _say("reference path: NumPy kernels (float64, sorted ranking, dense re-ranking) ...")
        # on the fast path's features: the kernels' results are then comparable value for value
        ref.update(_reference_kernels(args, q, g, re_ranking))
        ref["evaluation_s"] = ref.get("extraction_s", 0.0) + ref["distance_s"] + ref["ranking_s"] + ref.get("re_ranking_s", 0.0)
        ref["peak_host_bytes"] = _peak_host_bytes()
        result["reference"] = ref
        result["ratios"] = {"reference_over_fast": ref["evaluation_s"] / fast["evaluation_s"],
                            **{f"{k}_reference_over_fast": ref[f"{k}_s"] / fast[f"{k}_s"]
                               for k in ("extraction", "distance", "ranking", "re_ranking")
                               if f"{k}_s" in ref and fast.get(f"{k}_s")}}
        if ref.get("mAP") is not None:
            result["ratios"]["mAP_fast_minus_reference"] = fast["mAP"] - ref["mAP"]
        _say(f"reference: {ref['evaluation_s']:.2f} s; reference / fast = {result['ratios']['reference_over_fast']:.2f}x")
    if not args.features_only:
        result["accuracy"] = _accuracy_studies(args, device, net, data, q, g, fast)
    elif re_ranking:
        result["accuracy"] = {"rerank_gemm": {}}
        for gemm in [x for x in args.rerank_gemms.split(",") if x]:
            m = evaluate_features(q, g, re_ranking=True, rerank_gemm=gemm)
            result["accuracy"]["rerank_gemm"][gemm] = {"rr_mAP": m["rr_mAP"], "rr_mAP_minus_float32": m["rr_mAP"] - fast["rr_mAP"]}
    target = TARGETS_S.get(args.dataset)
    if device.type == "cuda" and args.scale == 1.0 and target and not args.features_only:
        result["target"] = {"evaluation_s": target, "met": fast["evaluation_s"] < target}
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result = run(args)
    env = result["environment"]
    path = write_result(result_path(Path(args.out), "eval", env), result)
    if not args.no_plot:
        paths = {"fast": result["fast"], **({"reference": result["reference"]} if "reference" in result else {})}
        stages = ["cache_build", "extraction", "distance", "ranking", "re_ranking"]
        stacked_bar_plot(path.with_suffix(".png"), list(paths), stages,
                         [[p.get(f"{s}_s", 0.0) for s in stages] for p in paths.values()], "seconds",
                         f"one evaluation, {args.dataset} x{args.scale} on {env['device_name']}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
