#!/usr/bin/env bash
# Every check that needs a GPU, in one call on the lent GPU machine (after DALI is staged, see
# ../shared/device/stage-dali): the gpu-marked tests, then the three benchmarks. Results go to
# bench/results/ and, when $OUT is set (the device tool's output folder), are copied there too.
#   export PYTHONPATH=/tmp/site; bash bench/gpu_checks.sh [quick]
# "quick" shortens the benchmarks (fewer steps and repeats) to fit a tight device budget.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || python3 -m pip install -q --no-deps -e .
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
status=0
python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tail -40 || status=1
steps=50; [ "${1:-}" = quick ] && steps=20
alr-fast bench train --steps "$steps" --warmup 10 || status=1
alr-fast bench pipeline || status=1
alr-fast bench kernels || status=1
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/results" && cp -r bench/results/. "$OUT/results/"; fi
exit $status
