#!/usr/bin/env bash
# Every check that needs a GPU, for the lent GPU machine (after DALI is staged, see
# ../shared/device/stage-dali): the gpu-marked tests, then the three benchmarks. Results go to
# bench/results/ and, when $OUT is set (the device tool's output folder), are copied there too.
#   export PYTHONPATH=/tmp/site; bash bench/gpu_checks.sh [quick] [STAGE ...]
# STAGE: tests, train, pipeline, kernels (default: all four). One device call may run at most
# 10 minutes, so a tight budget runs the stages over several calls. "quick" shortens the
# training benchmark (20 timed steps instead of 50).
set -uo pipefail
cd "$(dirname "$0")/.."
steps=50
if [ "${1:-}" = quick ]; then steps=20; shift; fi
stages=("$@"); [ ${#stages[@]} -eq 0 ] && stages=(tests train pipeline kernels)
for stage in "${stages[@]}"; do
  case "$stage" in tests|train|pipeline|kernels) ;;
    *) echo "gpu_checks.sh: unknown stage $stage (tests, train, pipeline, kernels)" >&2; exit 2 ;;
  esac
done
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || python3 -m pip install -q --no-deps -e .
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
status=0
for stage in "${stages[@]}"; do
  case "$stage" in
    tests) python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tail -40 || status=1 ;;
    train) python3 -m alr_fast.cli bench train --steps "$steps" --warmup 10 || status=1 ;;
    pipeline) python3 -m alr_fast.cli bench pipeline || status=1 ;;
    kernels) python3 -m alr_fast.cli bench kernels || status=1 ;;
  esac
done
if [ -n "${OUT:-}" ] && [ -d bench/results ]; then mkdir -p "$OUT/results" && cp -r bench/results/. "$OUT/results/"; fi
exit $status
