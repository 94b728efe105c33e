"""DDP through torchrun with gloo on the CPU: same losses as one process on the same global batch,
and the CLI trains with two processes (sharded evaluation, rank-0 checkpoints, per-rank resume)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alr_fast.runs import JsonlLog
from alr_fast.synthetic import make_synthetic

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path):
    ddp, single = tmp_path / "ddp.json", tmp_path / "single.json"
    proc = _torchrun(str(HERE / "ddp_worker.py"), str(ddp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    subprocess.run([sys.executable, str(HERE / "ddp_worker.py"), str(single), "--single", "2"], check=True)
    a, b = json.loads(ddp.read_text()), json.loads(single.read_text())
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
    assert a["checksum"] == pytest.approx(b["checksum"], rel=1e-6)
    assert a["losses"][0] != a["losses"][-1]  # the steps did change the model


@pytest.mark.slow
def test_torchrun_cli_trains_and_resumes_with_two_processes(tmp_path):
    root = tmp_path / "data"
    make_synthetic(root, "market1501", num_train_ids=8, num_test_ids=6, num_cameras=3, images_per_camera=2, seed=5)
    run = tmp_path / "run"
    tiny = [f"data.root={root}", "model.backbone=resnet18", "model.pretrained=none", "data.height=64", "data.width=32",
            "data.identities_per_batch=2", "data.images_per_identity=2", "data.steps_per_epoch=2",
            "data.num_workers=0", "optim.freeze_backbone_epochs=1", "eval.every_epochs=1", "eval.batch_size=8",
            "run.progress=false", "run.plots=false", "run.log_every=1"]
    proc = _torchrun("-m", "alr_fast.cli", "train", "--out", str(run), *tiny, "optim.epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"run_dir"') == 1  # one summary, rank 0's: rank 1's holds no metrics
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["loader"]) == 2
    assert ckpt["loader"][0] != ckpt["loader"][1]  # each rank has its own sampler stream
    metrics = JsonlLog(run / "metrics.jsonl").read()
    assert [m["epoch"] for m in metrics] == [1, 2]
    # the gathered shards are the whole test split, in order
    assert metrics[0]["num_query"] > 0
    from alr_fast.datasets import read_dataset

    ds = read_dataset("market1501", root)
    assert metrics[0]["num_query"] == len(ds.query) and metrics[0]["num_gallery"] == len(ds.gallery)
    # resuming needs as many processes; a single process is refused with a clear error
    alone = subprocess.run([sys.executable, "-m", "alr_fast.cli", "train", "--resume", str(run)], capture_output=True, text=True)
    assert alone.returncode == 2 and "2 processes" in alone.stderr
