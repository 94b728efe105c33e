"""The pipeline benchmark runs end to end on a CPU with tiny settings and writes its result file and plot."""
import importlib.util
import json

import pytest
import torch

from alr_fast.bench import pipeline as bench_pipeline

HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None


def test_bench_pipeline_writes_json_and_plot(tmp_path, capsys):
    argv = [
        "--device", "cpu", "--height", "32", "--width", "16", "--P", "2", "--K", "2", "--steps", "2", "--warmup", "1",
        "--workers", "0", "--dali-workers", "1", "--dali-threads", "1", "--backbone", "resnet18", "--ids", "4",
        "--precision", "fp32", "--out", str(tmp_path),
    ]
    assert bench_pipeline.main(argv) == 0
    (path,) = tmp_path.glob("pipeline-*.json")
    assert str(path) in capsys.readouterr().out
    assert path.with_suffix(".png").stat().st_size > 1000
    result = json.loads(path.read_text())
    env = result["environment"]
    assert result["kind"] == "pipeline" and env["device"] == "cpu" and env["device_name"]
    assert env["torch"] and env["torchvision"] and "cuda" in env and env["date"]
    assert (env["dali"] is not None) == HAS_DALI
    assert result["input_dtype"] == "float32"  # the trainer's input dtype on a CPU
    assert result["batch_size"] == 4 and result["dataset"]["images"] > 4 and result["dataset"]["identities"] == 4
    compute = result["compute"]
    assert compute["images_per_s"] > 0 and compute["steps"] == 2
    assert result["args"]["steps"] == 2 and result["args"]["out"] == str(tmp_path)
    assert set(result["results"]) == {"torch", "dali", "dali_parallel", "cache"}
    timed = ["torch", "cache"] + (["dali", "dali_parallel"] if HAS_DALI else [])
    for kind in timed:
        r = result["results"][kind]
        depth = {"torch": 0, "cache": 0}.get(kind, 2)  # no DataLoader workers here; DALI's prefetch queue is 2
        assert r["in_flight_batches"] == depth and r["warmup_batches"] == 1 + depth
        for mode in ("loader", "train"):
            # batches made ahead are drained untimed, and at least 4x as many timed as are in flight
            assert r[mode]["images_per_s"] > 0 and r[mode]["steps"] == max(2, 4 * depth)
            lat = r[mode]["latency_ms"]
            assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert r["train"]["fraction_of_compute"] == pytest.approx(r["train"]["images_per_s"] / compute["images_per_s"])
    assert result["results"]["cache"]["cache_bytes"] == result["dataset"]["images"] * 32 * 16 * 3
    if not HAS_DALI:
        assert "pip install nvidia-dali-cuda130" in result["results"]["dali"]["skipped"]


def test_in_flight_batches_of_each_loader():
    args = bench_pipeline._parser().parse_args(["--workers", "8"])
    assert bench_pipeline.in_flight_batches("torch", args) == 16  # 8 workers x prefetch factor 2
    assert bench_pipeline.in_flight_batches("dali", args) == bench_pipeline.in_flight_batches("dali_parallel", args) == 2
    assert bench_pipeline.in_flight_batches("cache", args) == 0


def test_bench_pipeline_rejects_unknown_loader(tmp_path):
    with pytest.raises(SystemExit, match="unknown loader"):
        bench_pipeline.main(["--loaders", "torch,opencv", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        bench_pipeline.main(["--help"])


def test_bench_pipeline_feeds_the_trainers_input_dtype():
    """On a GPU the loaders are timed in the dtype the trainer takes (its autocast dtype), on a CPU float32."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")  # no GPU needed: only the choice is checked
    expected = {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for precision, dtype in expected.items():
        args = bench_pipeline._parser().parse_args(["--precision", precision])
        assert bench_pipeline._input_dtype(args, cuda) == dtype
        assert bench_pipeline._input_dtype(args, cpu) == torch.float32
