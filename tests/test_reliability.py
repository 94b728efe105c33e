"""Training runs that go wrong (issue 12): divergence, signals, a second owner, damaged files,
evaluations that fail, early stops; and the seed's model selection rules (issue 11 section 6).

The reference trajectory is the session's finished TINY run (``tiny_run``): every interrupted
and resumed run here has the same config, so its logs must equal the reference's."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from alr_fast import trainer as trainer_module
from alr_fast.cli import main
from alr_fast.config import load_config
from alr_fast.runs import JsonlLog
from alr_fast.trainer import EpochPlan, evaluations_due, selection_split

from run_helpers import TINY, train

LOGS = ("losses.jsonl", "metrics.jsonl", "factors.jsonl")


def _strict_json_lines(path: Path) -> list[dict]:
    def refuse(token):
        raise AssertionError(f"{path} holds the non-JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _all_finite(path: Path) -> bool:
    state = torch.load(path, weights_only=True)
    return all(torch.isfinite(t).all() for t in state["task"].values() if t.is_floating_point())


def _same_logs(run: Path, reference: Path, exact: bool = True) -> None:
    """Byte-identical logs; across processes (another thread pool) floats may differ in the last bits."""
    for name in LOGS:
        if exact:
            assert (run / name).read_bytes() == (reference / name).read_bytes(), name
            continue
        got, want = JsonlLog(run / name).read(strict=True), JsonlLog(reference / name).read(strict=True)
        assert [sorted(r) for r in got] == [sorted(r) for r in want], name
        for a, b in zip(got, want):
            for key, value in b.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    assert a[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, key, a, b)
                else:
                    assert a[key] == value, (name, key, a, b)


def _last_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()[-1]


# --------------------------------------------------------------------------------------------
# model selection (pure rules, then end to end)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,split", [
    ([], "test"),
    (["data.testing_size=0", "data.validation_size=0.5"], "valid"),
    (["data.testing_size=0.5", "data.validation_size=0.5"], "test"),
    (["eval.re_ranking=true"], None),
    (["eval.re_ranking=true", "data.testing_size=0", "data.validation_size=0.5"], None),
    (["data.testing_size=0"], None),
])
def test_selection_split_is_the_seeds_monitor(overrides, split):
    assert selection_split(load_config(None, overrides)) == split


def test_extra_last_evaluation_is_report_only():
    cfg = load_config(None, ["eval.every_epochs=2", "data.validation_size=0.5", "eval.validation_every_epochs=2"])
    plan = [EpochPlan(0, "A", 0, True), EpochPlan(1, "B", 0, False), EpochPlan(2, "B", 1, False),
            EpochPlan(3, "B", 2, True)]
    due = [evaluations_due(cfg, ep, len(plan)) for ep in plan]
    assert due == [[], [], [("test", True), ("valid", True)], [("test", False)]]


def test_only_regular_phase_b_evaluations_of_the_monitored_split_select():
    from alr_fast.trainer import _select

    run = type("R", (), {})()
    run.selection, run.best, run.last_metrics = "test", {"split": None, "mAP": None, "epoch": None}, {}
    rows = [  # (record, selects?)
        ({"epoch": 1, "phase": "A", "split": "test", "mAP": 0.9}, False),  # phase A never selects
        ({"epoch": 2, "phase": "B", "split": "valid", "mAP": 0.9}, False),  # not the monitored split
        ({"epoch": 2, "phase": "B", "split": "test", "mAP": 0.3}, True),
        ({"epoch": 3, "phase": "B", "split": "test", "mAP": 0.3}, False),  # equal is not better (mode max)
        ({"epoch": 4, "phase": "B", "split": "test", "mAP": 0.5}, True),
        ({"epoch": 5, "phase": "B", "split": "test", "mAP": 0.9, "report_only": True}, False),  # the extra last one
    ]
    assert [_select(run, record) for record, _ in rows] == [want for _, want in rows]
    assert run.best == {"split": "test", "mAP": 0.5, "epoch": 4}
    assert run.last_metrics["epoch"] == 5  # still reported as the last metrics


@pytest.mark.slow
def test_validation_selects_without_a_test_split(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert train(run, tiny_data, "data.testing_size=0", "data.validation_size=0.5", "run.plots=false",
                 "optim.freeze_backbone_epochs=0") == 0
    valid = JsonlLog(run / "metrics.jsonl").read()
    assert [(m["split"], m["phase"]) for m in valid] == [("valid", "B"), ("valid", "B")]
    best = torch.load(run / "best.pt", weights_only=True)
    first_max = max(valid, key=lambda m: m["mAP"])  # the first of equal maxima, as Keras' ModelCheckpoint
    assert best["selected_on"] == "valid mAP" and best["epoch"] == first_max["epoch"]


@pytest.mark.slow
def test_re_ranking_during_training_keeps_the_final_model(tiny_data, tmp_path, capsys):
    """Also: with 3 epochs evaluated every 2, the last epoch's extra evaluation is marked report-only."""
    run = tmp_path / "run"
    assert train(run, tiny_data, "eval.re_ranking=true", "run.plots=false", "optim.freeze_backbone_epochs=0",
                 "optim.epochs=3", "eval.every_epochs=2") == 0
    err = capsys.readouterr().err
    assert "the seed's selection monitors a metric it does not compute, so it checkpoints nothing" in err
    assert "best.pt: the final model (epoch 3)" in err
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["epoch"] == 3 and best["selected_on"] == "final model"
    metrics = JsonlLog(run / "metrics.jsonl").read()
    assert [(m["epoch"], m.get("report_only", False)) for m in metrics] == [(2, False), (3, True)]
    assert all("rr_mAP" in m for m in metrics)


# --------------------------------------------------------------------------------------------
# divergence
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_divergence_stops_before_a_nan_model_is_written(tiny_data, tmp_path, capsys):
    """lr_base 1e9 after the one warm-up epoch: epoch 1 is fine, epoch 2's losses turn NaN. The run
    stops at that log read with exit 5 and one message; checkpoint.pt and best.pt stay epoch 1's."""
    run = tmp_path / "run"
    assert train(run, tiny_data, "optim.lr_base=1e9", "optim.freeze_backbone_epochs=0", "run.plots=false") == 5
    line = _last_line(capsys)
    assert line.startswith("alr-fast train: error: training diverged: the losses are not finite (")
    assert "in epoch 2/2 (phase B). Nothing non-finite was written: the last good checkpoint is " in line
    assert f"{run}/checkpoint.pt (after epoch 1 of 2). Try a lower learning rate (optim.lr_base, now 1e+09)" in line
    assert line.endswith("in a new run (--out DIR): --resume would repeat the same steps.")
    assert torch.load(run / "checkpoint.pt", weights_only=True)["next_index"] == 1
    assert _all_finite(run / "checkpoint.pt") and _all_finite(run / "best.pt")
    losses = _strict_json_lines(run / "losses.jsonl")
    assert losses[-1]["total"] is None and "total" in losses[-1]["non_finite"]
    assert all(r["total"] is not None for r in losses[:-1])
    assert [m["epoch"] for m in JsonlLog(run / "metrics.jsonl").read()] == [1]


def test_non_finite_weights_are_found_by_name():
    from alr_fast.guards import nonfinite_tensors

    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    named = list(net.named_parameters()) + list(net.named_buffers())
    assert nonfinite_tensors(named) == []
    with torch.no_grad():
        net[0].bias[1] = float("inf")
        net[1].running_var[0] = float("nan")
    assert nonfinite_tensors(list(net.named_parameters()) + list(net.named_buffers())) == ["0.bias", "1.running_var"]


# --------------------------------------------------------------------------------------------
# SIGTERM, a second owner, no orphaned workers, leftovers; then --resume on the same trajectory
# --------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_sigterm_a_second_owner_and_resume(tiny_data, tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.Popen([sys.executable, "-m", "alr_fast.cli", "train", "--out", str(run), f"data.root={tiny_data}",
                             *TINY, "data.num_workers=2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 300
        while not (run / "checkpoint.pt").is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        workers = _children(proc.pid)
        assert len(workers) >= 2  # the DataLoader's worker processes
        # a second owner is refused while the first trains: resume, a new run in the same place, evaluate
        for argv in (["train", "--resume", str(run)], ["evaluate", str(run)]):
            assert main(argv) == 2
            line = _last_line(capsys)
            assert f"is in use by pid {proc.pid} on host" in line and "nothing was changed in it" in line, line
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    last = err.splitlines()[-1]
    assert last.startswith("alr-fast train: interrupted by SIGTERM ")
    assert last.endswith(f"continue with: alr-fast train --resume {run}.") and "The last checkpoint is" in last
    time.sleep(1.0)  # less than the 5 s a worker's watchdog would need to notice an orphaned state
    assert not [w for w in workers if _alive(w)], "DataLoader workers outlived the run"
    (run / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"\0" * 1000)  # what a kill during a write leaves
    assert main(["train", "--resume", str(run), "run.plots=false"]) == 0
    assert not list(run.glob(".*.tmp"))
    assert "removed 1 temporary file(s) that an interrupted write left" in (run / "train.log").read_text()
    assert not (run / "run.lock").exists()
    _same_logs(run, tiny_run, exact=False)


# --------------------------------------------------------------------------------------------
# an evaluation that fails keeps the epoch it evaluates; resume evaluates it again
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("failure", ["unreadable query image", "disk full"])
def test_failing_evaluation_keeps_the_trained_epoch(failure, tiny_data, tiny_run, tmp_path, monkeypatch, capsys):
    """The second evaluation fails: an image that cannot be decoded (exit 2), or a full disk when
    its result is logged (exit 1, with how to continue). Epoch 2's checkpoint was written before,
    and --resume evaluates epoch 2 again and continues on the same trajectory."""
    import errno

    from alr_fast.pipelines.jpeg_store import CorruptImageError

    real_eval, real_fsync, evaluations, metric_syncs = trainer_module.evaluate_splits, os.fsync, [], []

    def failing_eval(*args, **kwargs):
        evaluations.append(1)
        if len(evaluations) == 2:
            raise CorruptImageError("query image 0001_c1s1_000001_00.jpg cannot be decoded")
        return real_eval(*args, **kwargs)

    def full_disk(fd):  # the disk fills up as the second evaluation's record is flushed
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            metric_syncs.append(fd)
            if len(metric_syncs) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    if failure == "disk full":
        monkeypatch.setattr(os, "fsync", full_disk)
    else:
        monkeypatch.setattr(trainer_module, "evaluate_splits", failing_eval)
    run = tmp_path / "run"
    assert train(run, tiny_data, "run.plots=false") == (1 if failure == "disk full" else 2)
    line = _last_line(capsys)
    if failure == "disk full":
        assert line == (f"alr-fast train: stopped: No space left on device ({run}/metrics.jsonl) in the evaluation "
                        f"after epoch 2/3. The last checkpoint is {run}/checkpoint.pt (after epoch 2 of 3); continue "
                        f"with: alr-fast train --resume {run}. Free some disk space first.")
    else:
        assert line.endswith("query image 0001_c1s1_000001_00.jpg cannot be decoded")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (state["next_index"], state["pending_eval"]) == (2, 1)  # epoch 2 was trained and kept
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "run.plots=false"]) == 0
    # the unreadable image stopped the evaluation before its record; the failed flush came after
    # the record reached the file, which the resume then finds complete instead of evaluating again
    assert ("evaluating epoch 2 first" in capsys.readouterr().err) == (failure != "disk full")
    _same_logs(run, tiny_run)


# --------------------------------------------------------------------------------------------
# SIGINT during a checkpoint write, in the quickstart: its advice, and it continues itself
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quickstart_interrupted_in_a_checkpoint_write_continues(tiny_data, tmp_path, monkeypatch, capsys):
    run, real_save, saves = tmp_path / "qs", torch.save, []

    def interrupted_save(obj, f, *args, **kwargs):
        saves.append(obj.get("next_index"))
        if obj.get("next_index") == 2:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C while epoch 2's checkpoint is written
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", interrupted_save)
    argv = ["quickstart", "--out", str(run), "--data", str(tiny_data), *TINY, "run.plots=false"]
    assert main(argv) == 130
    line = _last_line(capsys)
    assert line.startswith("alr-fast quickstart: interrupted by SIGINT after epoch 2/3. The last checkpoint is ")
    assert f"continue with: alr-fast quickstart --out {run} --data {tiny_data} " in line
    state = torch.load(run / "checkpoint.pt", weights_only=True)  # the interrupted write is complete
    assert state["next_index"] == 2 and zipfile.ZipFile(run / "checkpoint.pt").testzip() is None
    monkeypatch.setattr(torch, "save", real_save)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert f"quickstart: continuing the interrupted run in {run}" in captured.err
    assert "quickstart finished" in captured.out
    losses = JsonlLog(run / "losses.jsonl").read()
    assert [r["step"] for r in losses] == [2, 3, 5, 6, 8, 9]
    assert main(argv) == 2
    assert _last_line(capsys) == (f"alr-fast quickstart: error: {run} already holds a finished quickstart; nothing was "
                                  f"changed in it. See its results with: alr-fast evaluate {run}, or pass --out DIR "
                                  f"for a new quickstart")


# --------------------------------------------------------------------------------------------
# a start that stopped before its first checkpoint does not block a retry
# --------------------------------------------------------------------------------------------
def _stopped_early(run: Path, tiny_run: Path) -> Path:
    """What a kill -9 in the first epoch leaves: config, log, a few losses, a stale lock, a temporary."""
    run.mkdir()
    shutil.copy(tiny_run / "config.yaml", run / "config.yaml")
    (run / "train.log").write_text("12:00:00 INFO new run ...\n")
    (run / "losses.jsonl").write_text('{"epoch": 1, "step": 2, "total": 9.0}\n{"epoch": 1, "st')
    (run / "run.lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere", "since": "earlier"}))
    (run / ".checkpoint.pt.ab12cd.tmp").write_bytes(b"\0" * 100)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("how", ["same command", "--resume"])
def test_a_directory_without_checkpoint_does_not_block_a_retry(how, tiny_data, tiny_run, tmp_path, capsys):
    run = _stopped_early(tmp_path / "run", tiny_run)
    argv = (["train", "--resume", str(run), "run.plots=false"] if how == "--resume"
            else ["train", "--out", str(run), f"data.root={tiny_data}", *TINY, "run.plots=false"])
    assert main(argv) == 0
    log = (run / "train.log").read_text()
    assert log.startswith("12:00:00 INFO new run ...\n")  # the earlier attempt's log is kept
    assert "pid 999999 on host elsewhere (since earlier), which ended without releasing it" in log
    assert ("has no checkpoint yet (the start stopped before its first one): training from epoch 1" in log) == (
        how == "--resume")
    assert f"reusing {run}: it holds no checkpoint, only what a start that stopped early wrote" in log
    assert not list(run.glob(".*.tmp")) and not (run / "run.lock").exists()
    _same_logs(run, tiny_run)


@pytest.mark.slow
def test_an_empty_existing_directory_is_a_new_run_not_a_reused_one(tiny_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert main(["train", "--out", str(run), f"data.root={tiny_data}", *TINY, "optim.epochs=0",
                 "optim.freeze_backbone_epochs=1", "run.plots=false"]) == 0
    log = (run / "train.log").read_text()
    assert f"new run in {run}" in log and "reusing" not in log  # its own lock and log are no earlier start's


# --------------------------------------------------------------------------------------------
# resume: the checkpoint's config is the truth, logs are not edited silently, damage is refused
# --------------------------------------------------------------------------------------------
@pytest.fixture()
def finished_copy(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("evaluation-*", "cmc-*", "plots"))
    return run


@pytest.mark.slow
def test_resume_trusts_the_checkpoint_and_reports_what_differs(finished_copy, capsys):
    run = finished_copy
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("lr_base: 0.0002", "lr_base: 0.5"))
    (run / "factor_names.json").unlink()
    assert main(["train", "--resume", str(run), "run.plots=false"]) == 0
    err = capsys.readouterr().err
    assert (f"{config} differs from the checkpoint's config (optim.lr_base: 0.5 in the file, 0.0002 in the "
            f"checkpoint). The checkpoint's config is used and the file is left as it is") in err
    assert "lr_base: 0.5" in config.read_text()
    assert json.loads((run / "factor_names.json").read_text()) == torch.load(
        run / "checkpoint.pt", weights_only=True)["factor_names"]
    assert "factor_names.json is missing: written again from the checkpoint" in err
    # an empty or malformed config.yaml is only reported: the checkpoint carries the config
    for text in ("", "optim: [unclosed\n"):
        config.write_text(text)
        assert main(["train", "--resume", str(run), "run.plots=false"]) == 0
        assert "cannot be used" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_refuses_a_damaged_log_line_and_changes_nothing(finished_copy, capsys):
    run = finished_copy
    lines = (run / "losses.jsonl").read_text().splitlines()
    lines[2] = "#" + lines[2][1:]
    (run / "losses.jsonl").write_text("\n".join(lines) + "\n")
    before = (run / "losses.jsonl").read_bytes()
    assert main(["train", "--resume", str(run)]) == 2
    line = _last_line(capsys)
    assert line.startswith(f"alr-fast train: error: {run}/losses.jsonl line 3 is damaged (JSONDecodeError: ")
    assert (run / "losses.jsonl").read_bytes() == before and not (run / "run.lock").exists()


def test_damaged_or_hostile_checkpoint_is_refused_by_resume_and_evaluate(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_run / "config.yaml", run)
    raw = bytearray((tiny_run / "checkpoint.pt").read_bytes())
    with zipfile.ZipFile(tiny_run / "checkpoint.pt") as archive:
        record = max(archive.infolist(), key=lambda i: i.file_size)
    start = record.header_offset + 30 + len(record.filename.encode()) + 4096
    raw[start:start + 4096] = os.urandom(4096)  # 4 KiB of garbage inside a tensor's storage
    (run / "checkpoint.pt").write_bytes(bytes(raw))
    for argv in (["train", "--resume", str(run)], ["evaluate", str(run / "checkpoint.pt")]):
        assert main(argv) == 2
        assert _last_line(capsys).endswith(
            f"checkpoint {run}/checkpoint.pt is damaged: its record '{record.filename}' fails the CRC check; "
            f"nothing was loaded from it")
    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "alr-fast/2", "config": {}, "next_index": 1, "x": Hostile()}, run / "checkpoint.pt")
    for argv in (["train", "--resume", str(run)], ["evaluate", str(run / "checkpoint.pt")]):
        assert main(argv) == 2
        assert "is refused: it needs the Python object posix.system" in _last_line(capsys)
    assert not marker.exists()


@pytest.mark.gpu
def test_non_finite_check_on_cuda_tensors():
    """The multi-tensor inf-norm on CUDA (fp32, bf16, channels_last), as the trainer runs it there."""
    from alr_fast.guards import nonfinite_tensors

    dev = torch.device("cuda")
    named = [("conv", torch.randn(8, 4, 3, 3, device=dev).to(memory_format=torch.channels_last)),
             ("bf16", torch.randn(100, device=dev, dtype=torch.bfloat16)), ("big", torch.randn(1 << 20, device=dev)),
             ("steps", torch.zeros(3, dtype=torch.int64, device=dev))]
    assert nonfinite_tensors(named) == []
    named[2][1][12345] = float("nan")
    named[0][1][1, 2, 0, 1] = float("-inf")
    assert nonfinite_tensors(named) == ["conv", "big"]


@pytest.mark.gpu
@pytest.mark.slow
def test_divergence_stops_a_cuda_graph_run(tiny_data, tmp_path, capsys):
    """On a GPU the step is captured in CUDA graphs (run.compile=auto); the loss and weight checks
    run outside the graphs and still stop the run before a NaN model is written."""
    run = tmp_path / "run"
    assert train(run, tiny_data, "optim.lr_base=1e9", "optim.freeze_backbone_epochs=0", "run.plots=false",
                 "run.device=cuda", "run.precision=bf16") == 5
    assert "training diverged" in _last_line(capsys)
    assert _all_finite(run / "checkpoint.pt") and _all_finite(run / "best.pt")
