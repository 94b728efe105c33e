"""bench eval and bench recipe run end to end on a CPU at tiny sizes and write their results."""
from __future__ import annotations

import json

import numpy as np
import pytest

from alr_fast.bench import eval as bench_eval
from alr_fast.bench import recipe as bench_recipe
from alr_fast.bench import synthetic_fast
from alr_fast.cli import BENCHMARKS
from alr_fast.datasets import read_dataset


def _result(tmp_path, kind):
    (path,) = tmp_path.glob(f"{kind}-*.json")
    assert path.with_suffix(".png").stat().st_size > 1000
    return json.loads(path.read_text())


@pytest.mark.slow
def test_bench_eval_images_writes_breakdown_ratios_and_studies(tmp_path, capsys):
    argv = ["--scale", "0.003", "--height", "64", "--width", "32", "--precisions", "fp32,bf16",
            "--rerank-gemms", "float32,bf16", "--out", str(tmp_path)]
    assert bench_eval.main(argv) == 0
    r = _result(tmp_path, "eval")
    err = capsys.readouterr().err
    assert "no GPU: CPU-sized defaults backbone=resnet18" in err and "reference / fast" in err
    assert r["kind"] == "eval" and r["environment"]["device"] == "cpu" and r["dataset"]["query"] == 10
    fast, ref = r["fast"], r["reference"]
    for key in ("cache_build_s", "extraction_s", "distance_s", "ranking_s", "re_ranking_s", "evaluation_s"):
        assert isinstance(fast[key], float) and fast[key] > 0, key
    assert fast["extraction_images_per_s"] == pytest.approx((10 + 48) / fast["extraction_s"])
    assert ref["kernels_rule"] == "measured" and ref["extraction_s"] > 0 and ref["re_ranking_s"] > 0
    assert r["ratios"]["reference_over_fast"] == pytest.approx(ref["evaluation_s"] / fast["evaluation_s"])
    assert abs(r["ratios"]["mAP_fast_minus_reference"]) <= 1e-3  # float32 vs float64 on the same features
    study = r["accuracy"]
    assert set(study["precision"]) == {"bf16"} and "mAP_minus_fp32" in study["precision"]["bf16"]
    assert set(study["rerank_gemm"]) == {"float32", "bf16"}
    assert study["rerank_gemm"]["float32"]["rr_mAP_minus_float32"] == 0.0
    assert study["rerank_gemm"]["bf16"]["timing_meaningful"] is False  # an emulation on a CPU
    assert fast["peak_host_bytes"] > 0 and "target" not in r


def test_bench_eval_features_only_compares_the_kernel_paths(tmp_path):
    assert bench_eval.main(["--features-only", "--scale", "0.01", "--dim", "64", "--rerank-gemms", "float32,tf32",
                            "--out", str(tmp_path)]) == 0
    r = _result(tmp_path, "eval")
    assert r["dataset"]["features_only"] is True and r["dataset"]["query"] == 33 and r["dataset"]["gallery"] == 159
    assert "extraction_s" not in r["fast"] and r["reference"]["kernels_rule"] == "measured"
    assert abs(r["ratios"]["mAP_fast_minus_reference"]) <= 1e-3
    assert set(r["accuracy"]["rerank_gemm"]) == {"float32", "tf32"}
    assert r["ratios"]["distance_reference_over_fast"] > 0


def test_evaluations_in_schedule_follow_the_trainers_rule():
    assert bench_recipe.evaluations_in_schedule(20, 200, 10) == 22  # the seed: 2 in phase A, 20 in phase B
    assert bench_recipe.evaluations_in_schedule(1, 8, 2) == 4  # the quickstart
    assert bench_recipe.evaluations_in_schedule(0, 5, 10) == 1  # only the last epoch


@pytest.mark.slow
def test_bench_recipe_projects_the_schedule(tmp_path, capsys):
    argv = ["--scale", "0.003", "--steps", "1", "--warmup", "1", "--out", str(tmp_path), "data.height=64",
            "data.width=32", "data.identities_per_batch=4", "data.num_workers=0"]
    assert bench_recipe.main(argv) == 0
    r = _result(tmp_path, "recipe")
    assert "no GPU: CPU-sized work" in capsys.readouterr().err
    assert r["cpu_sized"] is True and r["config"]["backbone"] == "resnet18" and r["config"]["height"] == 64
    s, m, p = r["schedule"], r["measured"], r["projection"]
    assert (s["phase_A_epochs"], s["phase_B_epochs"], s["steps_per_epoch"], s["evaluations"], s["checkpoints"]) == \
        (20, 200, 200, 22, 220)
    assert p["phase_B_s"] == pytest.approx(200 * 200 * m["phase_B"]["step_s"])
    assert p["evaluations_s"] == pytest.approx(22 * m["evaluation_s"])
    assert p["total_s"] == pytest.approx(sum(v for k, v in p.items() if k.endswith("_s") and k != "total_s"))
    assert m["phase_A"]["timed_steps"] == 1 and m["checkpoint_s"] > 0 and 0 <= m["evaluation_mAP"] <= 1
    assert r["dataset"]["eval_loader"] == "CachedEvalLoader"


@pytest.mark.parametrize("dataset", ["market1501", "msmt17"])
def test_fast_generator_writes_readable_layouts_at_scaled_counts(tmp_path, dataset):
    counts = synthetic_fast.scaled_counts(dataset, 0.002)
    synthetic_fast.write_dataset(tmp_path, dataset, counts)
    d = read_dataset(dataset, tmp_path)
    assert (len(d.train), len(d.query), len(d.gallery)) == (counts["train"], counts["query"], counts["gallery"])
    assert d.num_classes == counts["train_ids"]
    q_store, q_pids, q_cams, g_store, g_pids, g_cams = synthetic_fast.eval_split(5, 20, 3, 2)
    assert len(q_store) == 5 and len(g_store) == 20 and q_store.data[0][:2] == b"\xff\xd8"
    assert set(np.unique(q_pids)) <= {1, 2, 3} and set(np.unique(g_pids)) <= {0, 1, 2, 3}


def test_benches_are_registered_in_the_cli():
    assert BENCHMARKS["eval"] == "eval" and BENCHMARKS["recipe"] == "recipe"
