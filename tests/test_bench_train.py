"""The training benchmark runs end to end on the CPU with tiny sizes and writes its JSON and plot."""
import json

import pytest

from alr_fast.cli import main


def test_bench_train_smoke(tmp_path, capsys):
    code = main(["bench", "train", "--modes", "eager_no_penalty,eager_reference,eager_fused,torch_loader",
                 "--backbone", "resnet18", "--height", "64", "--width", "32", "--P", "2", "--K", "2",
                 "--steps", "2", "--warmup", "1", "--workers", "0", "--capture", "none", "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    files = list(tmp_path.glob("train-*.json"))
    assert len(files) == 1 and files[0].with_suffix(".png").is_file()
    payload = json.loads(files[0].read_text())
    assert payload["environment"]["torch"] and payload["environment"]["device"] == "cpu"
    for mode in ("eager_no_penalty", "eager_reference", "eager_fused", "torch_loader"):
        r = payload["results"][mode]
        assert r["images_per_s"] > 0 and r["p50_s"] <= r["p99_s"] and r["steps"] == 2
    assert payload["results"]["eager_no_penalty"]["regularized_tensors"] == 0
    assert payload["results"]["eager_fused"]["regularized_tensors"] == 88  # ResNet-18 three-branch model
    assert "fused_penalty_fraction_of_eager_step" in payload["ratios"]
    assert "a_fused_over_a_reference" in payload["ratios"]


def test_bench_rejects_unknown_mode(tmp_path, capsys):
    assert main(["bench", "train", "--modes", "warp", "--out", str(tmp_path)]) == 2
    assert "unknown mode" in capsys.readouterr().err


def test_time_steps_pipelined_throughput_and_synced_percentiles():
    import time

    import torch

    from alr_fast.bench.common import time_steps

    calls = []

    def step():
        calls.append(1)
        time.sleep(0.002 if len(calls) % 2 else 0.001)

    stats = time_steps(step, torch.device("cpu"), steps=6, warmup=2)
    assert len(calls) == 2 + 2 * 6  # warmup, one pipelined pass, one synchronised pass
    assert stats["steps"] == 6 and stats["mean_s"] == pytest.approx(stats["total_s"] / 6)
    assert 0.001 <= stats["p50_s"] <= stats["p90_s"] <= stats["p99_s"] < 1.0
    assert stats["total_s"] >= 6 * 0.001 and stats["synced_mean_s"] >= 0.001
