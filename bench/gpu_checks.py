"""Every check that needs a GPU, in one bounded run: ``bash bench/gpu_checks.sh [--dry-run]``.

GPU time comes in short windows (one call of at most ~9 minutes on a cold machine, a handful of
files back), so this runs its stages in order of value, each under its own timeout, and never
lets one stage eat the others' time: a stage gets at most its cap and at most what is left of
``--budget``; a stage that would start with less than ``MIN_STAGE_S`` left is skipped and says
so. Everything it returns lies in ``$OUT`` (default: a new folder under bench/results/):

  summary.json      every stage: passed | failed | skipped | timeout, why, seconds, exit code,
                    test counts, and every figure of the result files it wrote
  gpu_checks.log    the full output of every stage (pytest output as it ran, not its tail)
  results.tar.gz    the benchmark result files (JSON + PNG) under results/

``--dry-run`` runs the same stages on the CPU with tiny sizes, the CuPy and DALI stages reported
as skipped, so that the script is known to work before it first runs on a GPU (CI runs it).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIN_STAGE_S = 20  # a stage that would get less than this is not started
DRY_RUN_CAP_FACTOR = 3
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "--durations=5"]
CLI = [sys.executable, "-m", "alr_fast.cli"]
ENV_SCRIPT = r"""
import json, os, platform, subprocess
info = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "machine": platform.machine()}
import numpy, torch, torchvision
info.update(numpy=numpy.__version__, torch=torch.__version__, torchvision=torchvision.__version__,
            torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_bytes=p.total_memory, multiprocessors=p.multi_processor_count,
                capability=f"{p.major}.{p.minor}", cudnn=torch.backends.cudnn.version())
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:
        info["nvidia_smi"] = f"unavailable: {exc}"
for name, module in (("cupy", "cupy"), ("dali", "nvidia.dali"), ("apex", "apex")):
    try:
        info[name] = __import__(module, fromlist=["__version__"]).__version__
    except Exception as exc:
        info[name] = None
        info[name + "_missing"] = f"{type(exc).__name__}: {exc}"
import alr_fast
info["alr_fast"] = os.path.dirname(alr_fast.__file__)
print("ENV " + json.dumps(info))
"""


@dataclass
class Stage:
    name: str
    what: str
    commands: list[list[str]]  # run in order; the first failure ends the stage
    cap_s: int  # the most this stage may take on a GPU
    skip: str = ""  # non-empty: the reason it does not run
    results: dict = field(default_factory=dict)


def _gpu_test_files(*names: str) -> list[str]:
    return [f"tests/{n}" for n in names if (ROOT / "tests" / n).is_file()]


def plan(dry_run: bool, results_dir: Path, dali: str) -> list[Stage]:
    """The stages in order of value. ``dali``: empty when DALI imports, else why not."""
    out = ["--out", str(results_dir)]
    tiny = ["--device", "cpu"] if dry_run else []
    cupy_skip = "dry run: the CuPy kernels need a GPU (their NumPy references run in the test suite)" if dry_run else ""
    dali_skip = ("dry run: DALI's GPU operators need a GPU (its CPU mode runs in the test suite)" if dry_run
                 else (f"DALI is not importable ({dali}): stage it onto PYTHONPATH to run the DALI tests and "
                       "bench pipeline" if dali else ""))
    train_tiny = ["--backbone", "resnet18", "--height", "64", "--width", "32", "--P", "2", "--K", "2",
                  "--steps", "2", "--warmup", "1", "--workers", "0"] if dry_run else ["--steps", "20", "--warmup", "5"]
    stages = [
        Stage("tests_kernels_cache", "gpu-marked tests of the CuPy kernels, the decode-once caches and the loaders",
              [[*PYTEST, "-m", "gpu", *_gpu_test_files(
                  "test_kernels_gpu.py", "test_kernels_host.py", "test_gpu_cache.py", "test_eval_cache.py",
                  "test_eval_extraction.py", "test_loaders.py")]], cap_s=90),
        Stage("capture", "the real three-branch ResNet-50 step captured in CUDA graphs (run.compile=cudagraphs) "
              "against eager: dynamo graphs, cudagraph_skips, losses",
              [[*CLI, "bench", "capture", "--modes", "cudagraphs",
                *(["--steps-per-phase", "2", "--timed-steps", "2", *tiny] if dry_run else []), *out]], cap_s=100),
        Stage("bench_kernels", "evaluation kernels at Market-1501 and MSMT17 scale against the NumPy reference",
              [[*CLI, "bench", "kernels", "--scales", "market,msmt17", "--repeat", "3", *out]], cap_s=75,
              skip=cupy_skip),
        Stage("bench_train", "training step: eager without / with the reference / with the fused penalty, and "
              "captured with run.compile=cudagraphs",
              [[*CLI, "bench", "train", "--modes", "eager_no_penalty,eager_reference,eager_fused,captured_cudagraphs",
                *train_tiny, *tiny, *out]], cap_s=75),
        Stage("bench_eval", "one whole Market-1501 evaluation at the real counts (cache, captured fp32 extraction, "
              "kernels) against the JPEG + eager + NumPy reference path, with the bf16 and tensor-core GEMM studies",
              [[*CLI, "bench", "eval", "--dataset", "market1501",
                *(["--device", "cpu"] if dry_run else ["--scale", "1.0", "--max-seconds", "60"]), *out]], cap_s=75),
        Stage("bench_recipe", "phase-A and phase-B steps and one evaluation of the Market-1501 ResNet-50 recipe "
              "(step under run.compile=cudagraphs), projected to the seed's 220 epochs",
              [[*CLI, "bench", "recipe", "--config", "market1501_resnet50",
                *(["--device", "cpu"] if dry_run else ["--steps", "30", "--warmup", "5", "--max-seconds", "20"]),
                *out, "run.compile=cudagraphs"]], cap_s=90),
        Stage("bench_eval_msmt17", "one whole MSMT17 evaluation at the real counts, bf16 extraction, bf16 "
              "re-ranking GEMMs beside float32",
              [[*CLI, "bench", "eval", "--dataset", "msmt17",
                *(["--device", "cpu"] if dry_run else ["--scale", "1.0", "--max-seconds", "30"]),
                "--precision", "bf16", "--precisions", "bf16", "--rerank-gemms", "float32,bf16", *out]], cap_s=90),
        Stage("tests_trainer", "gpu-marked tests of the trainer: sync-free steps under set_sync_debug_mode, captured "
              "steps against eager, fused Adam",
              [[*PYTEST, "-m", "gpu and not dali", *_gpu_test_files(
                  "test_profiling_compile.py", "test_step_syncs.py", "test_regularizer.py", "test_end_to_end.py")]],
              cap_s=90),
        Stage("bench_train_inductor", "the step under run.compile=reduce-overhead (Inductor + CUDA graphs): its "
              "compile time and speed beside cudagraphs",
              [[*CLI, "bench", "train", "--modes", "captured_cudagraphs,captured", "--steps", "20", "--warmup", "3",
                *out]], cap_s=150,
              skip="dry run: Inductor compiles the step for minutes on a CPU (the compiled step is tested in the "
                   "suite)" if dry_run else ""),
        Stage("dali", "DALI's GPU tests and bench pipeline",
              [[*PYTEST, "-m", "dali and gpu", "-rP", *_gpu_test_files("test_dali.py", "test_dali_gpu_graph.py")],
               [*CLI, "bench", "pipeline", "--steps", "20", "--warmup", "3", *out]], cap_s=120, skip=dali_skip),
    ]
    if dry_run:  # a CPU runs the tiny sizes several times slower than a GPU runs the real ones
        for stage in stages:
            stage.cap_s *= DRY_RUN_CAP_FACTOR
    return stages


class Log:
    """Every line to stdout and to the log file (tee)."""

    def __init__(self, path: Path) -> None:
        self.fh = open(path, "a", encoding="utf-8", errors="replace")

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        self.fh.write(text)
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def run_command(cmd: list[str], timeout_s: float, log: Log) -> tuple[int | None, str]:
    """(exit code or None on timeout, the output); the whole process group is killed at the timeout."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    shown = cmd if "-c" not in cmd else cmd[: cmd.index("-c") + 1] + ["<script>"]
    log.write(f"$ {shlex.join(shown)}   (timeout {timeout_s:.0f} s)\n")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    timed_out = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        if not sel.select(timeout=min(left, 1.0)):
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        log.write(line)
    if timed_out:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log.write(f"[timeout after {timeout_s:.0f} s: process group killed]\n")
        return None, "".join(lines)
    for line in proc.stdout:  # the rest after EOF (nothing, normally)
        lines.append(line)
        log.write(line)
    return proc.wait(), "".join(lines)


PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def pytest_counts(output: str) -> dict:
    """Counts from pytest's last summary line, and the ids of failed tests."""
    counts: dict = {}
    summary = [line for line in output.splitlines() if re.search(r" in [\d.]+s", line) and PYTEST_COUNT.search(line)]
    if summary:
        for n, kind in PYTEST_COUNT.findall(summary[-1]):
            counts["errors" if kind.startswith("error") else kind] = int(n)
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in output.splitlines()
              if line.startswith(("FAILED ", "ERROR "))]
    if failed:
        counts["failed_tests"] = failed[:50]
    return counts


def numeric_leaves(obj, prefix: str = "", out: dict | None = None, limit: int = 400) -> dict:
    """Every number and boolean of a result file as ``a.b.c: value`` (lists of more than 8 numbers,
    such as CMC curves, and lists of records, such as per-step losses, are left to the file)."""
    out = {} if out is None else out
    if len(out) >= limit:
        return out
    if isinstance(obj, bool) or (isinstance(obj, (int, float)) and not isinstance(obj, bool)):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("environment", "args"):
                continue
            numeric_leaves(v, f"{prefix}.{k}" if prefix else str(k), out, limit)
    elif isinstance(obj, list) and len(obj) <= 8 and all(isinstance(v, (int, float)) for v in obj):
        for i, v in enumerate(obj):
            numeric_leaves(v, f"{prefix}[{i}]", out, limit)
    return out


def result_figures(paths: list[Path]) -> dict:
    figures = {}
    for path in paths:
        if path.suffix != ".json":
            continue
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            figures[path.name] = {"unreadable": str(exc)}
            continue
        figures[path.name] = numeric_leaves(payload)
        for key in ("passed", "problems", "skipped"):
            if key in payload:
                figures[path.name][key] = payload[key]
        results = payload.get("results")
        if isinstance(results, dict):  # skipped modes with their reasons
            skipped = {m: r["skipped"] for m, r in results.items() if isinstance(r, dict) and "skipped" in r}
            if skipped:
                figures[path.name]["skipped_modes"] = skipped
    return figures


def run_stage(stage: Stage, budget_left: float, results_dir: Path, log: Log) -> dict:
    record = {"name": stage.name, "what": stage.what, "cap_s": stage.cap_s}
    if stage.skip:
        log.write(f"\n=== {stage.name}: skipped: {stage.skip}\n")
        return {**record, "status": "skipped", "reason": stage.skip, "seconds": 0.0}
    timeout = min(stage.cap_s, budget_left)
    if timeout < MIN_STAGE_S:
        reason = f"budget exhausted ({budget_left:.0f} s left, a stage needs {MIN_STAGE_S} s)"
        log.write(f"\n=== {stage.name}: skipped: {reason}\n")
        return {**record, "status": "skipped", "reason": reason, "seconds": 0.0}
    log.write(f"\n=== {stage.name}: {stage.what} (at most {timeout:.0f} s)\n")
    before = set(results_dir.iterdir())
    t0 = time.monotonic()
    status, reason, tests, codes = "passed", "", {}, []
    for cmd in stage.commands:
        left = timeout - (time.monotonic() - t0)
        if left < 1:
            status, reason = "timeout", f"the stage's {timeout:.0f} s ran out before {shlex.join(cmd[2:5])}"
            break
        code, output = run_command(cmd, left, log)
        codes.append(code)
        if "pytest" in cmd:
            tests = {**tests, **pytest_counts(output)}
        if code is None:
            status, reason = "timeout", f"killed after the stage's {timeout:.0f} s"
            break
        if code != 0:
            status = "failed"
            reason = f"{shlex.join(cmd[2:5])} exited {code}"
            if code == 5 and "pytest" in cmd:
                reason = "pytest collected no test"
            break
    seconds = time.monotonic() - t0
    if status == "passed" and tests and not tests.get("passed") and tests.get("skipped"):
        reason = "every test skipped (no GPU here)"
    new = sorted(set(results_dir.iterdir()) - before)
    record.update(status=status, reason=reason, seconds=round(seconds, 1), exit_codes=codes,
                  files=[p.name for p in new])
    if tests:
        record["tests"] = tests
    figures = result_figures(new)
    if figures:
        record["figures"] = figures
    log.write(f"=== {stage.name}: {status}{f' ({reason})' if reason else ''} in {seconds:.1f} s\n")
    return record


def environment_stage(log: Log) -> dict:
    """(a) versions and the device; installs this checkout (no dependencies) where alr_fast does not
    import from it."""
    t0 = time.monotonic()
    log.write("\n=== environment: versions, device, install\n")
    probe = [sys.executable, "-c", "import alr_fast.kernels, alr_fast.pipelines, os; print(os.path.dirname(alr_fast.__file__))"]
    code, out = run_command(probe, 60, log)
    if code != 0 or not out.strip().startswith(str(ROOT)):
        run_command([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."], 120, log)
    code, out = run_command([sys.executable, "-c", ENV_SCRIPT], 120, log)
    info = {}
    for line in out.splitlines():
        if line.startswith("ENV "):
            info = json.loads(line[4:])
    status = "passed" if code == 0 and info else "failed"
    record = {"name": "environment", "what": "versions, device, install", "status": status,
              "reason": "" if status == "passed" else f"the environment probe exited {code}",
              "seconds": round(time.monotonic() - t0, 1), "figures": info}
    log.write(f"=== environment: {status} in {record['seconds']} s\n")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bash bench/gpu_checks.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the same stages on the CPU with tiny sizes")
    p.add_argument("--budget", type=float, default=None, help="seconds for all stages together (default 510: with "
                   "the start and the transfers, one call of 9 minutes; 1200 for a dry run, whose caps are 3x)")
    p.add_argument("--only", default="", help="comma list of stage names to run (the others are reported skipped)")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 1200.0 if args.dry_run else 510.0
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results" / f"gpu-checks-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    results_dir = out / "results.staging"
    results_dir.mkdir(exist_ok=True)
    log = Log(out / "gpu_checks.log")
    start = time.monotonic()
    log.write(f"gpu_checks {'dry run ' if args.dry_run else ''}in {ROOT}, budget {args.budget:.0f} s, output {out}\n")
    stages_done = [environment_stage(log)]
    env = stages_done[0]["figures"]  # the environment probe tried to import DALI
    dali_missing = "" if env.get("dali") else env.get("dali_missing", "import failed (the environment probe failed)")
    only = {s for s in args.only.split(",") if s}
    for stage in plan(args.dry_run, results_dir, dali_missing):
        if only and stage.name not in only:
            stage.skip = f"not among --only {args.only}"
        left = args.budget - (time.monotonic() - start)
        stages_done.append(run_stage(stage, left, results_dir, log))
    files = sorted(p for p in results_dir.iterdir() if p.suffix in (".json", ".png"))
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=f"results/{f.name}")
    for f in results_dir.iterdir():
        f.unlink()
    results_dir.rmdir()
    counts = {s: sum(1 for r in stages_done if r["status"] == s) for s in ("passed", "failed", "timeout", "skipped")}
    summary = {"dry_run": args.dry_run, "budget_s": args.budget, "seconds": round(time.monotonic() - start, 1),
               "counts": counts, "result_files": [f.name for f in files], "stages": stages_done}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log.write("\n" + "\n".join(f"{r['name']:<22} {r['status']:<8} {r['seconds']:>6.1f} s  {r.get('reason', '')}"
                               for r in stages_done) + "\n")
    log.write(f"summary: {out / 'summary.json'} ({counts})\n")
    log.close()
    return 1 if counts["failed"] or counts["timeout"] else 0


if __name__ == "__main__":
    sys.exit(main())
