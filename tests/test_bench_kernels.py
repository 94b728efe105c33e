"""CPU smoke tests of ``bench/kernels.py``: the reference-only run, the no-GPU exit, and the
GPU branch's bookkeeping driven through a NumPy stand-in for CuPy and the NumPy backend."""
from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest

from alr_fast.bench import kernels as bench
from alr_fast.kernels import gpu


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--help"])
    assert exc.value.code == 0 and "--reference-only" in capsys.readouterr().out


def test_without_gpu_says_so_and_times_the_reference(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "gpu_status", lambda: (None, "no CUDA device found"))
    assert bench.main(["--scales", "smoke", "--dim", "16", "--ref-queries", "25", "--ref-rerank", "20x90",
                       "--out", str(tmp_path)]) == 0
    assert "no usable GPU (no CUDA device found): timing the NumPy reference alone" in capsys.readouterr().err
    (json_path,) = tmp_path.glob("kernels-cpu-*.json")
    assert json.loads(json_path.read_text())["args"]["reference_only"] is True


def test_unknown_scale_is_refused(tmp_path, capsys):
    assert bench.main(["--reference-only", "--scales", "smoke,huge", "--out", str(tmp_path)]) == 2
    assert "unknown scale(s) huge" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_reference_only_writes_json_and_plot(tmp_path):
    assert bench.main(["--reference-only", "--scales", "smoke", "--dim", "16", "--ref-queries", "25",
                       "--ref-rerank", "20x90", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("kernels-cpu-*.json")
    assert json_path.with_suffix(".png").stat().st_size > 1000
    report = json.loads(json_path.read_text())
    assert report["device"] == "cpu" and report["versions"]["numpy"] == np.__version__
    # arguments stored as JSON numbers, booleans and text, not their str()
    assert report["args"]["dim"] == 16 and report["args"]["no_rerank"] is False and report["args"]["out"] == str(tmp_path)
    rows = {r["kernel"]: r for r in report["results"]}
    assert set(rows) == {"distmat", "ranking", "rerank"}
    assert rows["ranking"]["ref_subset"] == "25 queries x 300"
    assert rows["ranking"]["ref_extrapolated_s"] == pytest.approx(rows["ranking"]["ref_s"] * 60 / 25)
    n_ratio = (60 + 300) / (20 + 90)
    assert rows["rerank"]["ref_extrapolated_s"] == pytest.approx(rows["rerank"]["ref_s"] * n_ratio ** 2)


class _Event:
    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


class _Hook:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


FAKE_CUPY = SimpleNamespace(  # just what the bench touches, on NumPy
    asnumpy=np.asarray, ones=np.ones, empty=np.empty, empty_like=np.empty_like, asarray=np.asarray,
    random=SimpleNamespace(
        standard_normal=lambda shape, dtype: np.random.default_rng(0).standard_normal(shape, dtype=dtype)),
    cuda=SimpleNamespace(Event=_Event, get_elapsed_time=lambda a, b: 1e3 * (b.t - a.t),
                         Device=lambda *a: SimpleNamespace(synchronize=lambda: None), MemoryHook=_Hook),
    get_default_memory_pool=lambda: SimpleNamespace(used_bytes=lambda: 0, free_all_blocks=lambda: None),
)


def test_gpu_branch_rows_validate_and_merge(tmp_path):
    args = bench.build_parser().parse_args(["--scales", "smoke", "--dim", "16", "--repeat", "1",
                                            "--ref-queries", "30", "--ref-rerank", "20x90"])
    peaks = bench.measure_peaks(FAKE_CUPY, gemm=gpu.NUMPY_BACKEND.gemm_f32, size=64, copy_bytes=1 << 16, repeat=1)
    assert peaks["gemm_float16_tflops"] > 0 and peaks["copy_gbps"] > 0
    scale = bench.SCALES["smoke"]
    split = bench.make_split(np, scale, 16, seed=1)
    assert split[0].shape == (60, 16) and split[0].min() >= 0 and (split[3] == 0).any()
    rows = bench.bench_gpu(FAKE_CUPY, split, scale, args, peaks, backend=gpu.NUMPY_BACKEND)
    by_kernel = {(r["kernel"], r.get("dtype")): r for r in rows}
    assert by_kernel[("distmat", "float16")]["max_abs_err"] < 1e-4
    assert by_kernel[("ranking", "float32")]["matches_reference"] is True
    assert by_kernel[("rerank", "float32")]["max_abs_err"] < 1e-5
    assert all(r["gpu_s"] > 0 for r in rows)
    merged = bench.merge_rows(rows, bench.bench_reference(split, scale, args))
    ranking = next(r for r in merged if r["kernel"] == "ranking")
    assert ranking["speedup_vs_reference"] == pytest.approx(ranking["ref_extrapolated_s"] / ranking["gpu_s"])
    report = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-01-02T03:04:05", "results": merged}
    json_path, png_path = bench.write_results(report, tmp_path)
    # the naming rule of every benchmark: <kind>-<device>-<date>-<time>
    assert re.fullmatch(r"kernels-nvidia-h100-80gb-hbm3-\d{8}-\d{6}\.json", json_path.name) and png_path.exists()
    assert json.loads(json_path.read_text())["results"][0]["scale"] == "smoke"
