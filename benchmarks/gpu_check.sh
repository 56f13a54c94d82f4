#!/usr/bin/env bash
# GPU check of the CUDA backend, for a GPU machine with no network access.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Run from the repository root. OUT_DIR defaults to $OUT, else benchmarks/results/gpu-<date>.
# Steps (each bounded by a timeout, so whatever finished is always written):
#   1. environment report                                  -> env.txt
#   2. POT from carried wheels (.whl/*.whl, if present) into /tmp/site, the project from
#      the working tree (editable install, PYTHONPATH as a fallback)
#   3. build both extensions (python -m sinkhorn_ot build)  -> build.log
#   4. CUDA tests (pytest -m cuda tests/test_cuda.py: dense solve and point-cloud
#      solve_points), torch.compile/opcheck last            -> pytest_cuda.log, pytest_cuda_slow.log
#   4c. a row-sharded solve over NCCL on CUDA tensors (torchrun --nproc_per_node 1,
#      examples/distributed_sinkhorn.py)                    -> distributed.log
#   5. benchmark grid (benchmarks/gpu/bench.py: dense sections, then the point-cloud grid,
#      N = M up to 100 000, D in {3, 64}, in pair evaluations per second)
#                                                           -> bench.json, bench.md
#   5b. fixed cost of a sinkhorn() call against the bare op, host reads and kernel
#      launches per call (benchmarks/test_call_overhead.py; needs pytest-benchmark,
#      carry its wheel)                                     -> cuda-call-overhead.md
#   6. summary of all of it                                 -> summary.md
# Budget: about 6 minutes on one H100/H200 with MAX_JOBS=16 (the issue allows 8).
# Exit status: non-zero if the build or any CUDA test failed.
#
# POT wheel for the device (Python 3.12), fetched once on a machine with network:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl pot==0.9.7.post1
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }
status=0

# CUDA_HOME: torch guesses it from `which nvcc`, which is wrong when nvcc is a wrapper
# script outside the toolkit (then the build cannot find cuda_runtime.h).
if [ -z "${CUDA_HOME:-}" ] || [ ! -f "${CUDA_HOME}/include/cuda_runtime.h" ]; then
  for cand in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /x/x/x)")")")"; do
    if [ -f "$cand/include/cuda_runtime.h" ]; then export CUDA_HOME="$cand"; break; fi
  done
fi

stamp "1. environment"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
  echo "CUDA_HOME=${CUDA_HOME:-unset}"
  "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version 2>&1 | tail -2
  "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no device')" 2>&1
  nproc
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

stamp "2. install"
if ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip_project.log 2>&1; then
  echo "editable install failed (see below); using PYTHONPATH=$PWD"; tail -5 /tmp/pip_project.log
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import ot; print('POT', ot.__version__)" 2>&1 | tail -1

stamp "3. build (MAX_JOBS=$MAX_JOBS)"
if ! timeout 200 "$PY" -m sinkhorn_ot build --cuda > "$OUT_DIR/build.log" 2>&1; then
  status=1
  echo "BUILD FAILED"; grep -iE "error" "$OUT_DIR/build.log" | head -20
fi
tail -3 "$OUT_DIR/build.log"
INFO="$("$PY" -m sinkhorn_ot info 2>&1 | grep -E '^(torch|native-)')"
echo "$INFO"

stamp "4. CUDA tests"
PT_TIMEOUT=()
"$PY" -c "import pytest_timeout" 2> /dev/null && PT_TIMEOUT=(--timeout=60)
timeout 150 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider -rfEs \
  "${PT_TIMEOUT[@]}" -k "not compile and not opcheck" > "$OUT_DIR/pytest_cuda.log" 2>&1
rc=$?; [ $rc -ne 0 ] && status=1
tail -15 "$OUT_DIR/pytest_cuda.log"

stamp "4c. sharded solve over NCCL (torchrun --nproc_per_node 1)"
TORCHRUN="$(dirname "$(command -v "$PY")")/torchrun"; [ -x "$TORCHRUN" ] || TORCHRUN=torchrun
timeout 90 "$TORCHRUN" --nproc_per_node 1 examples/distributed_sinkhorn.py \
  > "$OUT_DIR/distributed.log" 2>&1
rc3=$?; [ $rc3 -ne 0 ] && status=1
tail -3 "$OUT_DIR/distributed.log"

stamp "5. benchmarks"
timeout 140 "$PY" benchmarks/gpu/bench.py --out "$OUT_DIR" 2>&1 | tail -40

stamp "5b. per-call overhead"
if "$PY" -c "import pytest_benchmark" 2> /dev/null; then
  timeout 90 "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_call_overhead.py \
    --benchmark --bench-device cuda --bench-out "$OUT_DIR" > "$OUT_DIR/call_overhead.log" 2>&1
  tail -12 "$OUT_DIR/call_overhead.log"
else
  echo "pytest-benchmark missing (carry its wheel in .whl/): per-call overhead not measured"
fi

stamp "4b. torch.compile and opcheck tests"
# One compile thread: no inductor worker pool (one hung the interpreter at exit once).
TORCHINDUCTOR_COMPILE_THREADS=1 timeout 150 "$PY" -m pytest -q -m cuda tests/test_cuda.py \
  -p no:cacheprovider -rfEs -k "compile or opcheck" > "$OUT_DIR/pytest_cuda_slow.log" 2>&1
rc2=$?; [ $rc2 -ne 0 ] && status=1
tail -6 "$OUT_DIR/pytest_cuda_slow.log"

stamp "6. summary"
{
  echo "# GPU check: $(head -3 "$OUT_DIR/env.txt" | tail -1)"
  echo
  echo '```'
  cat "$OUT_DIR/env.txt"
  echo "$INFO"
  echo "pytest (cuda): $(tail -1 "$OUT_DIR/pytest_cuda.log")"
  echo "pytest (compile/opcheck): $(tail -1 "$OUT_DIR/pytest_cuda_slow.log")"
  echo "sharded over NCCL: $(tail -1 "$OUT_DIR/distributed.log")"
  echo "total: $(( $(date +%s) - T0 )) s, exit status $status"
  echo '```'
  echo
  [ -f "$OUT_DIR/bench.md" ] && cat "$OUT_DIR/bench.md"
  [ -f "$OUT_DIR/cuda-call-overhead.md" ] && cat "$OUT_DIR/cuda-call-overhead.md"
  echo
  echo "## Failures"
  echo '```'
  grep -E "^(FAILED|ERROR)" "$OUT_DIR/pytest_cuda.log" "$OUT_DIR/pytest_cuda_slow.log" | head -40
  echo '```'
} > "$OUT_DIR/summary.md"
stamp "done, exit status $status"
exit $status
