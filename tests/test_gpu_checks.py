"""bench/gpu_checks.sh: stages under their own timeouts within one budget, a summary of every
stage, at most six files back; its --dry-run runs the same stages on the CPU."""
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the runner is run by path on the GPU machine, before any install
import gpu_checks  # noqa: E402


def test_pytest_counts_read_the_summary_line_and_failed_ids():
    out = ("....F.s\nFAILED tests/test_a.py::test_x[gpu] - AssertionError: 3 != 4\n"
           "ERROR tests/test_b.py::test_y - RuntimeError\n"
           "= 1 failed, 5 passed, 2 skipped, 1 error, 87 deselected in 12.34s =\n")
    counts = gpu_checks.pytest_counts(out)
    assert counts == {"failed": 1, "passed": 5, "skipped": 2, "errors": 1, "deselected": 87,
                      "failed_tests": ["tests/test_a.py::test_x[gpu]", "tests/test_b.py::test_y"]}


def test_numeric_leaves_keep_figures_and_leave_curves_and_records_to_the_file():
    payload = {"environment": {"torch": "2.11"}, "args": {"steps": 5},
               "results": {"eager": {"images_per_s": 10.5, "ok": True, "note": "text"}},
               "cmc": list(range(50)), "pair": [1, 2], "losses": [{"total": 1.0}]}
    assert gpu_checks.numeric_leaves(payload) == {"results.eager.images_per_s": 10.5, "results.eager.ok": True,
                                                  "pair[0]": 1, "pair[1]": 2}


def test_a_command_past_its_timeout_is_killed_with_its_children(tmp_path):
    log = gpu_checks.Log(tmp_path / "log")
    marker = tmp_path / "child-alive"
    # the child outlives the parent's kill unless the whole process group goes
    cmd = ["bash", "-c", f"(sleep 3; touch {marker}) & echo started; sleep 30"]
    t0 = time.monotonic()
    code, out = gpu_checks.run_command(cmd, 1.5, log)
    log.close()
    assert code is None and "started" in out and time.monotonic() - t0 < 10
    time.sleep(3.5)
    assert not marker.exists()
    assert "[timeout after 2 s: process group killed]" in (tmp_path / "log").read_text()


def test_stages_get_at_most_their_cap_and_what_is_left(tmp_path):
    log = gpu_checks.Log(tmp_path / "log")
    results = tmp_path / "r"
    results.mkdir()
    slow = gpu_checks.Stage("slow", "sleeps", [["sleep", "30"]], cap_s=gpu_checks.MIN_STAGE_S + 1)
    t0 = time.monotonic()
    record = gpu_checks.run_stage(slow, 1000.0, results, log)
    assert record["status"] == "timeout" and time.monotonic() - t0 < gpu_checks.MIN_STAGE_S + 10
    late = gpu_checks.Stage("late", "never starts", [["true"]], cap_s=60)
    record = gpu_checks.run_stage(late, gpu_checks.MIN_STAGE_S - 1, results, log)
    assert record["status"] == "skipped" and "budget exhausted" in record["reason"]
    bad = gpu_checks.Stage("bad", "fails", [["false"], ["true"]], cap_s=60)
    record = gpu_checks.run_stage(bad, 100.0, results, log)
    assert record["status"] == "failed" and record["exit_codes"] == [1]  # the first failure ends the stage
    log.close()


def test_every_planned_stage_has_a_cap_and_the_caps_fit_the_gpu_budget():
    stages = gpu_checks.plan(False, Path("/tmp/x"), dali="")
    names = [s.name for s in stages]
    assert names[:4] == ["tests_kernels_cache", "capture", "bench_kernels", "bench_train"]  # order of value
    assert names[-1] == "dali" and len(set(names)) == len(names)
    # the stages of issue 9's list (b)-(e) and the two evaluation benches fit 510 s at their caps
    core = sum(s.cap_s for s in stages if s.name in ("tests_kernels_cache", "capture", "bench_kernels", "bench_train",
                                                    "bench_eval", "bench_recipe"))
    assert core <= 510, core
    dry = {s.name: s for s in gpu_checks.plan(True, Path("/tmp/x"), dali="")}
    assert dry["bench_kernels"].skip and dry["dali"].skip and dry["bench_train_inductor"].skip
    no_dali = {s.name: s for s in gpu_checks.plan(False, Path("/tmp/x"), dali="No module named 'nvidia'")}
    assert "No module named 'nvidia'" in no_dali["dali"].skip


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_returns_at_most_six_files(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_checks.sh"), "--dry-run"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=1500)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_checks.log", "results.tar.gz", "summary.json"], files  # <= 6, no folders
    summary = json.loads((out / "summary.json").read_text())
    by_name = {s["name"]: s for s in summary["stages"]}
    assert proc.returncode == 0, (proc.stdout[-4000:], {n: (s["status"], s.get("reason")) for n, s in by_name.items()})
    assert list(by_name) == ["environment"] + [s.name for s in gpu_checks.plan(True, out, dali="")]
    for name, stage in by_name.items():
        assert stage["status"] in ("passed", "skipped"), (name, stage)
        if stage["status"] == "skipped":
            assert stage["reason"], name
    assert by_name["environment"]["figures"]["torch"] and by_name["environment"]["figures"]["cuda_available"] is False
    assert by_name["tests_kernels_cache"]["tests"]["skipped"] > 0  # the gpu tests were collected and skipped
    capture = next(iter(by_name["capture"]["figures"].values()))
    assert capture["passed"] is True and capture["results.cudagraphs.unique_graphs"] == 2
    assert by_name["bench_train"]["figures"]  # the benchmark's figures are in the summary
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert sorted(Path(n).name for n in names) == sorted(summary["result_files"]) and all(
        n.startswith("results/") for n in names)
    log = (out / "gpu_checks.log").read_text()
    assert "=== capture" in log and "passed" in log and "step 0 (A): total captured" in log  # the full output
