"""The training benchmark runs end to end on the CPU with tiny sizes and writes its JSON and plot; on a CPU
without flags it picks CPU-sized work and says so."""
import json

import pytest
import torch

from alr_fast.cli import main


@pytest.mark.slow
def test_bench_train_default_modes_on_a_cpu_skip_inductor_and_say_so(tmp_path, capsys):
    """Without --modes on a CPU: every mode but Inductor's "captured", whose skip and reason are
    printed and stored; the cudagraphs capture runs (the backend skips the graphs on a CPU)."""
    code = main(["bench", "train", "--height", "64", "--width", "32", "--P", "2", "--K", "2", "--steps", "2",
                 "--warmup", "1", "--workers", "0", "--device", "cpu", "--capture", "none", "--out", str(tmp_path)])
    assert code == 0
    err = capsys.readouterr().err
    assert "captured skipped: Inductor" in err
    assert "no GPU, so CPU-sized defaults: --backbone resnet18" in err  # the options not given
    assert "--height" not in err.split("CPU-sized defaults")[1].splitlines()[0]  # given ones are not listed
    (path,) = tmp_path.glob("train-*.json")
    payload = json.loads(path.read_text())
    assert "Inductor" in payload["results"]["captured"]["skipped"]
    cg = payload["results"]["captured_cudagraphs"]
    assert cg["compile_mode"] == "cudagraphs" and cg["images_per_s"] > 0 and cg["warmup_s"] > 0
    assert payload["args"]["steps"] == 2 and payload["args"]["backbone"] == "resnet18"
    assert payload["args"]["out"] == str(tmp_path)  # paths stored as text
    assert "b_cudagraphs_over_a_fused" in payload["ratios"]
    assert path.with_suffix(".png").is_file()
    assert payload["environment"]["torch"] and payload["environment"]["device"] == "cpu"
    for mode in ("eager_no_penalty", "eager_reference", "eager_fused", "torch_loader"):
        r = payload["results"][mode]
        assert r["images_per_s"] > 0 and r["p50_s"] <= r["p99_s"] and r["steps"] == 2
    assert payload["results"]["eager_no_penalty"]["regularized_tensors"] == 0
    assert payload["results"]["eager_fused"]["regularized_tensors"] == 88  # ResNet-18 three-branch model
    assert "fused_penalty_fraction_of_eager_step" in payload["ratios"]
    assert "a_fused_over_a_reference" in payload["ratios"]


def test_sized_defaults_fill_only_what_was_not_given(capsys):
    import argparse

    from alr_fast.bench.common import apply_sized_defaults

    gpu, cpu = dict(steps=50, height=384), dict(steps=5, height=128)
    args = argparse.Namespace(steps=None, height=64)
    assert apply_sized_defaults(args, torch.device("cpu"), gpu, cpu, "bench x") == ["steps"]
    assert (args.steps, args.height) == (5, 64)
    assert capsys.readouterr().err.strip() == "bench x: no GPU, so CPU-sized defaults: --steps 5 (set any of them to change it)"
    args = argparse.Namespace(steps=None, height=None)
    apply_sized_defaults(args, torch.device("cuda"), gpu, cpu, "bench x")
    assert (args.steps, args.height) == (50, 384) and capsys.readouterr().err == ""  # a GPU says nothing


def test_bench_rejects_unknown_mode(tmp_path, capsys):
    assert main(["bench", "train", "--modes", "warp", "--out", str(tmp_path)]) == 2
    assert "unknown mode" in capsys.readouterr().err


def test_time_steps_pipelined_throughput_and_synced_percentiles():
    import time

    from alr_fast.bench.common import time_steps

    calls = []

    def step():
        calls.append(1)
        time.sleep(0.002 if len(calls) % 2 else 0.001)

    stats = time_steps(step, torch.device("cpu"), steps=6, warmup=2)
    assert len(calls) == 2 + 2 * 6  # warmup, one pipelined pass, one synchronised pass
    assert stats["warmup_steps"] == 2 and 0.002 <= stats["warmup_s"] < 1.0
    assert stats["steps"] == 6 and stats["mean_s"] == pytest.approx(stats["total_s"] / 6)
    assert 0.001 <= stats["p50_s"] <= stats["p90_s"] <= stats["p99_s"] < 1.0
    assert stats["total_s"] >= 6 * 0.001 and stats["synced_mean_s"] >= 0.001
