#!/usr/bin/env bash
# Every check that needs a GPU, in one bounded run for a short GPU window (a cold H200, one call
# of at most ~9 minutes, a few files back). Stages run in order of value, each under its own
# timeout within --budget seconds (default 510):
#   environment          versions, device; installs this checkout (--no-deps) where needed
#   tests_kernels_cache  gpu-marked tests of the CuPy kernels, the decode-once caches, the loaders
#   capture              the real ResNet-50 step under run.compile=cudagraphs vs eager
#   bench_kernels        evaluation kernels at Market-1501 and MSMT17 scale
#   bench_train          training step: eager, penalty reference vs fused, cudagraphs capture
#   bench_eval           end-to-end evaluation against the reference path
#   bench_recipe         one epoch of each phase + one evaluation, projected to the full recipe
#   tests_trainer        gpu-marked trainer tests (sync-free steps, captured vs eager)
#   bench_train_inductor run.compile=reduce-overhead beside cudagraphs (Inductor compile time)
#   dali                 DALI's GPU tests and bench pipeline, only when DALI imports
# Output, in $OUT (the device tool's output folder; default bench/results/gpu-checks-<time>/):
# summary.json (every stage: passed/failed/timeout/skipped, why, seconds, figures),
# gpu_checks.log (the full output) and results.tar.gz (the benchmarks' JSON and PNG files).
#   bash bench/gpu_checks.sh [--dry-run] [--budget SECONDS] [--only STAGE,...]
# --dry-run: the same stages on the CPU with tiny sizes, CuPy and DALI stages reported skipped.
# DALI is used when `import nvidia.dali` works, e.g. after installing its wheel into a folder on
# PYTHONPATH. Exit status 0 when no stage failed or timed out.
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 -u bench/gpu_checks.py "$@"
