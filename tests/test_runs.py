"""Run directories without training: the lock, safe and verified checkpoints, atomic writes under
signals and full disks, strict JSONL logs, and which directories a new run or a resume may use."""
import errno
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from alr_fast import runs
from alr_fast.runs import (
    CHECKPOINT_FORMAT, CheckpointError, JsonlLog, RunDirError, RunLock, check_new_run_dir, check_resume_dir,
    load_checkpoint, remove_temporaries, save_checkpoint, signals_deferred,
)


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"format": CHECKPOINT_FORMAT, "config": {"run": {"seed": seed}}, "next_index": 3,
            "task": {"w": torch.randn(64, 64, generator=g), "b": torch.randn(4096, generator=g)}}


def _holder(run: Path, fork_child: bool = False) -> subprocess.Popen:
    """A process that takes the run's lock (and optionally forks a child that outlives it)."""
    code = (
        "import os, sys, time\n"
        "from alr_fast.runs import RunLock\n"
        "RunLock(sys.argv[1]).acquire()\n"
        "child = os.fork() if sys.argv[2] == '1' else -1\n"
        "if child == 0:\n"
        "    time.sleep(60); os._exit(0)\n"
        "print(child, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(run), "1" if fork_child else "0"],
                            stdout=subprocess.PIPE, text=True)
    proc.child = int(proc.stdout.readline())
    return proc


# --------------------------------------------------------------------------------------------
# one owner per run directory
# --------------------------------------------------------------------------------------------
def test_second_owner_is_refused_with_the_holder_named(tmp_path):
    first = RunLock(tmp_path).acquire()
    owner = json.loads((tmp_path / "run.lock").read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(RunDirError) as err:
        RunLock(tmp_path).acquire(advice="or do something else")
    message = str(err.value)
    assert message.startswith(f"run directory {tmp_path} is in use by pid {os.getpid()} on host {socket.gethostname()}")
    assert message.endswith("Wait for it to finish or stop it, then try again; or do something else.")
    first.release()
    assert not (tmp_path / "run.lock").exists()
    RunLock(tmp_path).acquire().release()


def test_lock_of_a_killed_process_is_detected_and_taken_over(tmp_path):
    """Another process holds the run; once it is killed (kill -9, no cleanup), the file it leaves
    is reported and taken over, even while the child it forked (as DataLoader workers are) lives on."""
    holder = _holder(tmp_path, fork_child=True)
    try:
        with pytest.raises(RunDirError, match=f"in use by pid {holder.pid} on host {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
        holder.kill()
        holder.wait()
        assert os.path.exists(f"/proc/{holder.child}")  # the forked child lives on ...
        assert (tmp_path / "run.lock").exists()  # ... and the killed owner left its file, but not the lock
        lock = RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        os.kill(holder.child, signal.SIGKILL)
    assert lock.stale["pid"] == holder.pid
    assert lock.describe_stale().endswith("which ended without releasing it (killed, or the machine went down); taken over")
    lock.release()


# --------------------------------------------------------------------------------------------
# safe loading: weights_only, CRCs, format
# --------------------------------------------------------------------------------------------
class _Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    zipped, legacy = tmp_path / "evil.pt", tmp_path / "evil.pkl"
    torch.save({"format": CHECKPOINT_FORMAT, "config": {}, "payload": _Hostile(marker)}, zipped)
    with open(legacy, "wb") as fh:
        pickle.dump(_Hostile(marker), fh)
    with pytest.raises(CheckpointError, match=r"evil.pt is refused: it needs the Python object posix.system"):
        load_checkpoint(zipped)
    with pytest.raises(CheckpointError, match=r"evil.pkl is not a readable checkpoint archive"):
        load_checkpoint(legacy)
    assert not marker.exists()
    # the file is hostile for real: a trusting load runs its command
    torch.load(zipped, weights_only=False)
    assert marker.exists()


def test_checkpoint_damaged_inside_a_tensor_record_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state())
    assert torch.equal(load_checkpoint(path)["task"]["w"], _state()["task"]["w"])
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda i: i.file_size)  # the largest tensor's storage
    raw = bytearray(path.read_bytes())
    start = record.header_offset + 30 + len(record.filename.encode()) + 128  # past the alignment padding
    raw[start:start + 4096] = os.urandom(4096)
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == (f"checkpoint {path} is damaged: its record '{record.filename}' fails the CRC check; "
                              f"nothing was loaded from it")


def test_files_that_are_not_alr_fast_checkpoints(tmp_path):
    plain = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.ones(2)}, plain)
    with pytest.raises(CheckpointError, match=r"weights.pth is a torch file but not an alr-fast checkpoint \(keys conv.weight\)"):
        load_checkpoint(plain)
    old = tmp_path / "old.pt"
    torch.save({"format": "alr-fast/1", "config": {}}, old)
    with pytest.raises(CheckpointError, match=r"has format 'alr-fast/1'; this alr-fast reads 'alr-fast/2'"):
        load_checkpoint(old)
    with pytest.raises(RunDirError, match="holds neither best.pt nor checkpoint.pt"):
        load_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------------
# atomic writes: verified before the rename, complete under SIGINT, clean on a full disk
# --------------------------------------------------------------------------------------------
def test_a_damaged_write_never_replaces_the_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(0))
    before = path.read_bytes()
    real_write = runs._Sink.write

    def flip_a_byte(self, data):  # what a faulty disk or driver would do after the CRC was computed
        data = bytearray(data)
        if len(data) > 1000:
            data[500] ^= 0xFF
        return real_write(self, bytes(data))

    monkeypatch.setattr(runs._Sink, "write", flip_a_byte)
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint.pt \(as written\) is damaged: its record"):
        save_checkpoint(path, _state(1))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoints_and_logs_get_the_modes_of_plain_files(tmp_path, umask):
    """A colleague who can read the run directory can read its checkpoints (mkstemp alone gives 0600)."""
    before = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "checkpoint.pt", _state(0))
        runs.atomic_write_bytes(tmp_path / "factor_names.json", b"[]")
        (tmp_path / "plain").write_bytes(b"")
    finally:
        os.umask(before)
    plain = (tmp_path / "plain").stat().st_mode & 0o777
    assert plain == 0o666 & ~umask
    for name in ("checkpoint.pt", "factor_names.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == plain, name


def test_disk_full_during_a_checkpoint_write(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(0))
    before = path.read_bytes()

    class FullDisk:  # the file object of a disk that fills up after 20 kB
        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 20000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def flush(self):
            self.fh.flush()

    real_init = runs._Sink.__init__
    monkeypatch.setattr(runs._Sink, "__init__", lambda self, fh: real_init(self, FullDisk(fh)))
    with pytest.raises(OSError) as err:
        save_checkpoint(path, _state(1))
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert "No space left on device" in str(err.value) and "Traceback" not in str(err.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


@pytest.fixture
def ctrl_c_raises():
    """Python's own SIGINT handler for the test: a shell that starts pytest in the background (or
    CI under nohup) hands it an ignored SIGINT, under which Ctrl-C rightly does nothing."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_sigint_during_a_checkpoint_write_waits_for_the_rename(tmp_path, monkeypatch, ctrl_c_raises):
    path = tmp_path / "checkpoint.pt"
    real_save = torch.save

    def interrupted_save(obj, f, *args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C while the file is being written
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _state(2))
    assert torch.equal(load_checkpoint(path)["task"]["b"], _state(2)["task"]["b"])  # complete and verified
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_signals_are_delivered_after_the_block(tmp_path, ctrl_c_raises):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            signal.raise_signal(signal.SIGINT)
            done.append("finished")
    assert done == ["finished"]


def test_an_ignored_signal_stays_ignored_after_the_block():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals_deferred():
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


# --------------------------------------------------------------------------------------------
# JSONL logs
# --------------------------------------------------------------------------------------------
def test_non_finite_values_are_logged_as_null_and_named(tmp_path):
    log = JsonlLog(tmp_path / "losses.jsonl")
    log.append({"step": 3, "total": float("nan"), "ce_0": float("inf"), "cmc": [0.5, float("-inf")], "lr": 1e-4})
    text = (tmp_path / "losses.jsonl").read_text()

    def strict(token):
        raise ValueError(f"non-strict JSON token {token}")

    record = json.loads(text, parse_constant=strict)
    assert record == {"step": 3, "total": None, "ce_0": None, "cmc": [0.5, None], "lr": 1e-4,
                      "non_finite": ["ce_0", "cmc", "total"]}


def test_damaged_lines_are_reported_and_a_cut_last_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = JsonlLog(path)
    for epoch in (1, 2, 3):
        log.append({"epoch": epoch})
    path.write_bytes(path.read_bytes() + b'{"epoch": 4, "mA')  # what a kill -9 leaves
    assert [r["epoch"] for r in log.read(strict=True)] == [1, 2, 3]
    assert log.keep(lambda r: r["epoch"] <= 2) == 1
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + '{"epoch": 1.5 garbage\n' + lines[1] + "\n")
    assert [r["epoch"] for r in log.read()] == [1, 2]  # plots skip it
    with pytest.raises(RunDirError) as err:
        log.keep(lambda r: True)
    assert str(err.value).startswith(f"{path} line 2 is damaged (JSONDecodeError: '{{\"epoch\": 1.5 garbage'); ")
    assert "Repair or delete that line" in str(err.value)
    assert "garbage" in path.read_text()  # nothing was changed


# --------------------------------------------------------------------------------------------
# which directories a new run or a resume may use
# --------------------------------------------------------------------------------------------
def _early_stop_dir(path: Path) -> Path:
    """What a start killed in its first epoch leaves."""
    path.mkdir()
    for name in ("config.yaml", "train.log", "losses.jsonl", "factor_names.json"):
        (path / name).write_text("{}\n")
    (path / "run.lock").write_text('{"pid": 1, "host": "h"}')
    (path / ".checkpoint.pt.ab12_x9.tmp").write_bytes(b"\0" * 100)
    (path / "plots").mkdir()
    return path


def test_directory_rules(tmp_path):
    assert check_new_run_dir(tmp_path / "absent") is False
    (tmp_path / "empty").mkdir()
    assert check_new_run_dir(tmp_path / "empty") is False
    early = _early_stop_dir(tmp_path / "early")
    assert check_new_run_dir(early) is True  # reusable: nothing in it but what alr-fast writes before a checkpoint
    assert check_resume_dir(early) is False  # --resume starts it again from epoch 1
    (early / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError) as err:
        check_new_run_dir(early)
    assert str(err.value) == (f"run directory {early} already exists and holds files alr-fast did not write "
                              f"(notes.txt); nothing was changed in it. Choose another --out.")
    done = _early_stop_dir(tmp_path / "done")
    (done / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(RunDirError, match=r"already holds a run \(checkpoint.pt\); nothing was changed in it. Continue"):
        check_new_run_dir(done)
    with pytest.raises(RunDirError, match=r"already holds a run \(checkpoint.pt\); nothing was changed in it. Go away.$"):
        check_new_run_dir(done, advice="Go away.")
    assert check_resume_dir(done) is True
    with pytest.raises(RunDirError, match="no such run directory"):
        check_resume_dir(tmp_path / "absent")
    with pytest.raises(RunDirError, match="holds neither checkpoint.pt nor config.yaml"):
        check_resume_dir(tmp_path / "empty")


def test_temporaries_of_killed_writes_are_removed(tmp_path):
    run = _early_stop_dir(tmp_path / "run")
    (run / ".best.pt.q1w2e3.tmp").write_bytes(b"\0" * 10)
    (run / ".mine.tmp").write_bytes(b"")  # not one of ours
    assert remove_temporaries(run) == [(".best.pt.q1w2e3.tmp", 10), (".checkpoint.pt.ab12_x9.tmp", 100)]
    assert (run / ".mine.tmp").exists() and not list(run.glob(".checkpoint.pt.*"))
