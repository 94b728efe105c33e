"""The CLI end to end on a tiny synthetic dataset: train, plots, resume after kill -9, evaluate,
and the errors a user meets first (existing run directory, bad config key, bad data)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alr_fast.cli import main
from alr_fast.runs import JsonlLog

from run_helpers import TINY, train as _train


@pytest.fixture(scope="module")
def data_root(tiny_data):
    return tiny_data


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny_run):
    return tiny_run


def test_train_writes_a_complete_run_directory(finished_run):
    run = finished_run
    for name in ("config.yaml", "train.log", "metrics.jsonl", "losses.jsonl", "factors.jsonl", "factor_names.json",
                 "checkpoint.pt", "best.pt", "plots/losses.png", "plots/metrics.png", "plots/cmc.png", "plots/factors.png"):
        assert (run / name).is_file(), name
    metrics = JsonlLog(run / "metrics.jsonl").read()
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert [m["phase"] for m in metrics] == ["A", "B", "B"]
    for m in metrics:
        assert {"mAP", "rank1", "rank5", "rank10"} <= set(m) and 0 <= m["mAP"] <= 1
        assert len(m["cmc"]) == min(50, m["num_gallery"]) and all(a <= b for a, b in zip(m["cmc"], m["cmc"][1:]))
    factors = JsonlLog(run / "factors.jsonl").read()
    names = json.loads((run / "factor_names.json").read_text())
    assert [f["epoch"] for f in factors] == [1, 2, 3] and all(len(f["factors"]) == len(names) for f in factors)
    # phase A: only the heads' thetas move, and every theta only decreases (dR/dtheta >= 0)
    heads = [i for i, n in enumerate(names) if n.split(".")[0] in ("stripe_convs", "necks", "classifiers")]
    backbone = [i for i in range(len(names)) if i not in heads]
    assert all(factors[0]["theta"][i] == 0.0 for i in backbone)
    assert all(factors[0]["theta"][i] < 0.0 for i in heads)
    assert all(b <= a for a, b in zip(factors[1]["theta"], factors[2]["theta"]))
    best = torch.load(run / "best.pt", weights_only=False)
    assert best["phase"] == "B" and best["metrics"]["mAP"] == max(m["mAP"] for m in metrics if m["phase"] == "B")


def test_existing_run_directory_is_left_alone(finished_run, data_root, capsys):
    before = _tree(finished_run)
    assert _train(finished_run, data_root) == 2
    assert capsys.readouterr().err == (
        f"alr-fast train: error: run directory {finished_run} already holds a run (checkpoint.pt); nothing was "
        f"changed in it. Continue it with: alr-fast train --resume {finished_run}, or choose another --out.\n"
    )
    assert _tree(finished_run) == before


def test_evaluate_command_with_re_ranking(finished_run, capsys):
    assert main(["evaluate", str(finished_run), "--re-ranking", "run.progress=false"]) == 0
    out = capsys.readouterr().out
    assert "mAP" in out and "re-ranked" in out
    reports = sorted(finished_run.glob("evaluation-*.json"))
    assert reports
    m = json.loads(reports[-1].read_text())["metrics"]
    assert 0 <= m["rr_mAP"] <= 1 and m["num_query"] > 0
    best = torch.load(finished_run / "best.pt", weights_only=False)
    assert m["mAP"] == pytest.approx(best["metrics"]["mAP"], abs=1e-6)  # same model, same full test set


def _cli(*args, cwd=None):
    return [sys.executable, "-m", "alr_fast.cli", *args]


def test_kill_9_then_resume_continues_the_same_schedule(data_root, tmp_path):
    """A run killed with SIGKILL and resumed ends with exactly the losses of an uninterrupted run."""
    reference = tmp_path / "reference"
    assert _train(reference, data_root, "optim.epochs=3", "run.plots=false") == 0
    env = dict(os.environ, OMP_NUM_THREADS="2")
    for attempt in range(3):  # on a heavily loaded machine the run may finish before the kill lands
        killed = tmp_path / f"killed{attempt}"
        proc = subprocess.Popen(_cli("train", "--out", str(killed), f"data.root={data_root}", *TINY, "optim.epochs=3",
                                     "run.plots=false"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not (killed / "checkpoint.pt").is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert (killed / "checkpoint.pt").is_file()
        done = torch.load(killed / "checkpoint.pt", weights_only=False)["next_index"]
        if done < 4:
            break
    assert 1 <= done < 4, "the kill should land before the last epoch"
    assert main(["train", "--resume", str(killed), "run.progress=false"]) == 0
    ref_losses = JsonlLog(reference / "losses.jsonl").read()
    got_losses = JsonlLog(killed / "losses.jsonl").read()
    assert [r["step"] for r in got_losses] == [r["step"] for r in ref_losses]
    for a, b in zip(got_losses, ref_losses):
        assert a["lr"] == b["lr"]
        assert a["total"] == pytest.approx(b["total"], rel=1e-5)
    ref_m = JsonlLog(reference / "metrics.jsonl").read()
    got_m = JsonlLog(killed / "metrics.jsonl").read()
    assert [m["epoch"] for m in got_m] == [m["epoch"] for m in ref_m]
    assert [m["mAP"] for m in got_m] == pytest.approx([m["mAP"] for m in ref_m], abs=1e-5)


def test_resume_refuses_schedule_changes(finished_run, capsys):
    assert main(["train", "--resume", str(finished_run), "optim.epochs=9"]) == 2
    assert "optim.epochs cannot change when resuming" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["optim.epoch=3"], "unknown config key 'optim.epoch'"),
        (["data.root=/nonexistent/datasets"], "/nonexistent/datasets"),
        (["run.precision=fp8"], "'run.precision' must be one of"),
    ],
)
def test_bad_config_and_missing_dataset(tmp_path, args, needle, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), *TINY, *args]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir()) or needle.startswith("/")


@pytest.fixture()
def broken_copy(data_root, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(data_root, root)
    return root, root / "Market-1501-v15.09.15" / "bounding_box_train"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pytest.warns re-emits torchvision's, unfiltered
def test_corrupt_jpeg_is_named(broken_copy, tmp_path, capsys):
    root, train = broken_copy
    victim = sorted(train.glob("*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])  # truncated
    assert main(["train", "--out", str(tmp_path / "r"), f"data.root={root}", *TINY]) == 2
    assert victim.name in capsys.readouterr().err
    # with skip_corrupt the run goes on without it, with a warning that names it
    with pytest.warns(UserWarning, match=f"(?s)skipping 1 of .*{victim.name}: truncated"):
        assert main(["train", "--out", str(tmp_path / "r2"), f"data.root={root}", *TINY, "optim.epochs=0",
                     "data.skip_corrupt=true", "run.plots=false"]) == 0


def test_misnamed_file_is_named(broken_copy, tmp_path, capsys):
    root, train = broken_copy
    shutil.copy(sorted(train.glob("*.jpg"))[0], train / "person_7.jpg")
    assert main(["train", "--out", str(tmp_path / "r"), f"data.root={root}", *TINY]) == 2
    assert "person_7.jpg" in capsys.readouterr().err


def test_validation_split_is_evaluated(data_root, tmp_path):
    run = tmp_path / "valid"
    assert _train(run, data_root, "data.validation_size=0.5", "optim.epochs=1", "run.plots=false",
                  "eval.validation_every_epochs=1") == 0
    metrics = JsonlLog(run / "metrics.jsonl").read()
    valid = [m for m in metrics if m["split"] == "valid"]
    assert [m["epoch"] for m in valid] == [1, 2]
    assert all(0 <= m["mAP"] <= 1 and m["num_query"] > 0 and m["num_gallery"] > 0 for m in valid)


@pytest.mark.parametrize("loader", ["dali", "cache"])
def test_other_loader_backends_train_on_the_cpu(data_root, tmp_path, loader):
    """DALI (CPU operators) and the decode-once cache plug into the same loop; their first
    epoch's losses equal the torch loader's (same sampler stream, same augmentation params)."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    runs = {}
    for kind in ("torch", loader):
        run = tmp_path / kind
        assert _train(run, data_root, f"data.loader={kind}", "optim.epochs=1", "run.plots=false") == 0
        runs[kind] = JsonlLog(run / "losses.jsonl").read()
    first, other = runs["torch"][0], runs[loader][0]
    tol = 5e-3 if loader == "dali" else 1e-6  # DALI's resize differs by at most 1 grey level
    assert other["total"] == pytest.approx(first["total"], rel=tol)


@pytest.mark.parametrize("error,code,says", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 3, "ran out of memory"),
    (torch._dynamo.exc.TorchDynamoException("inductor failed"), 4, "run.compile=none"),
])
def test_step_failures_exit_with_advice_and_keep_the_checkpoint(data_root, tmp_path, monkeypatch, capsys,
                                                                error, code, says):
    """A GPU out of memory (exit 3) or a torch.compile failure (exit 4) mid-training ends with a
    line that says what to do; the checkpoint of the finished epoch stays for --resume."""
    from alr_fast.trainer import Trainer

    real_step, calls = Trainer.train_step, []

    def failing_step(self, batch):
        calls.append(1)
        if len(calls) > 3:  # epoch 0 (3 steps) completes and is checkpointed
            raise error
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", failing_step)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), f"data.root={data_root}", *TINY]) == code
    err = capsys.readouterr().err
    assert says in err.splitlines()[-1]
    assert torch.load(run / "checkpoint.pt", weights_only=False)["next_index"] == 1
