#!/usr/bin/env bash
# GPU check for a machine without network access: builds jacobian_ext in place against the torch found
# there (which may be older than ours), runs the test suite (it covers CUDA when a GPU is visible), runs the
# GPU benchmark and writes logs and tables to OUTDIR. Ends within 10 minutes whatever happens: every step
# stops at its own limit or at the script's, whichever comes first. Prints a short summary last.
#
#   bench/gpu_check.sh OUTDIR
#
# A benchmark that succeeds is also copied to bench/GPU_RESULTS.md, to be committed (it names the card and
# the date).
#
# Environment: PYTHON (default python3), TEST_TIMEOUT_S and BENCH_TIMEOUT_S (step limits; 0 skips the benchmark), TORCH_CUDA_ARCH_LIST (default: the visible card's
# architecture only, which halves the .cu compile time against a multi-architecture build), MAX_JOBS.
set -uo pipefail

OUTDIR=${1:?usage: bench/gpu_check.sh OUTDIR}
PYTHON=${PYTHON:-python3}
TOTAL_LIMIT_S=570  # the script's own limit: 30 s inside the ten minutes, for a kill's grace and the summary
BUILD_TIMEOUT_S=300
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-150}
BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S:-240}  # 0 skips the benchmark (a correctness-only run)
BENCH_MIN_S=90  # with less time left the benchmark would time too few cases to be worth starting
BENCH_MARGIN_S=60  # of the benchmark's time, left over by --max-seconds: Python's start, the last case, the report
PROBE_TIMEOUT_S=60  # the short Python and driver queries
KILL_AFTER_S=10  # a step still running this long after timeout's SIGTERM gets SIGKILL

seconds_for() {  # CAP -> the seconds a step may take: CAP, or what is left before TOTAL_LIMIT_S if less
  local left=$((TOTAL_LIMIT_S - SECONDS))
  echo $((left < $1 ? left : $1))
}

within() {  # CAP COMMAND...: runs COMMAND for at most `seconds_for CAP`; 124 (timed out) when no time is left
  local seconds
  seconds=$(seconds_for "$1")
  shift
  [ "$seconds" -gt 0 ] || return 124
  timeout -k "$KILL_AFTER_S" "$seconds" "$@"
}

describe_rc() {  # exit status -> word
  case "$1" in
    0) echo "ok" ;;
    -1) echo "not run" ;;
    124 | 137) echo "TIMED OUT" ;;  # 137: killed KILL_AFTER_S after the SIGTERM
    *) echo "FAILED (exit $1)" ;;
  esac
}

mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  within "$PROBE_TIMEOUT_S" nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  within "$PROBE_TIMEOUT_S" "$PYTHON" -c \
    'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())'
  command -v nvcc && within "$PROBE_TIMEOUT_S" nvcc --version | tail -n 2
  echo "ninja: $(ninja --version 2>/dev/null || echo 'not found, setuptools compiles one file at a time')"
  echo "cpus: $(nproc)"
} > "$OUTDIR/environment.txt" 2>&1

CARD=$(within "$PROBE_TIMEOUT_S" "$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null ||
  echo "no CUDA device")
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$(within "$PROBE_TIMEOUT_S" "$PYTHON" -c \
    'import torch;print(".".join(map(str,torch.cuda.get_device_capability())))' 2>/dev/null || echo "8.0;9.0")
fi
export TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-$(nproc)}

# In place (not pip install -e), so nothing outside this folder changes.
build_start=$SECONDS
within "$BUILD_TIMEOUT_S" "$PYTHON" setup.py build_ext --inplace > "$OUTDIR/build.log" 2>&1
build_rc=$?
build_s=$((SECONDS - build_start))
with_cuda=$(within "$PROBE_TIMEOUT_S" "$PYTHON" -c 'from jacobian_ext import _build_info as b; print(b.WITH_CUDA)' \
  2>/dev/null || echo "unknown")

test_rc=-1
test_s=0
if [ "$build_rc" -eq 0 ]; then
  test_start=$SECONDS
  # Not the minutes-long AOTInductor test, nor the CMake-built C++ example (make test covers it on the CPU).
  within "$TEST_TIMEOUT_S" "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider -m "not slow" --ignore=tests/test_cpp.py tests \
    --junitxml="$OUTDIR/tests.xml" > "$OUTDIR/tests.log" 2>&1
  test_rc=$?
  test_s=$((SECONDS - test_start))
fi

# Outcome counts of the tests that ran on CUDA (a "cuda" parameter, or tests/test_cuda.py).
cuda_counts=$(within "$PROBE_TIMEOUT_S" "$PYTHON" - "$OUTDIR/tests.xml" <<'PY' 2>/dev/null || echo "no results"
import collections, sys, xml.etree.ElementTree as ET
counts = collections.Counter()
for case in ET.parse(sys.argv[1]).iter("testcase"):
    if "cuda" not in case.get("name", "") and "test_cuda" not in case.get("classname", ""):
        continue
    outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
    counts[outcome] += 1
print(", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "none ran")
PY
)

# The benchmark gets what the build and tests left, up to BENCH_TIMEOUT_S, and starts no case in the last
# BENCH_MARGIN_S of it, so that it writes its table rather than being killed.
bench_rc=-1
bench_limit_s=$(seconds_for "$BENCH_TIMEOUT_S")
if [ "$build_rc" -ne 0 ]; then
  bench_line="not run (the build failed)"
elif [ "$BENCH_TIMEOUT_S" -eq 0 ]; then
  bench_line="not run (BENCH_TIMEOUT_S=0)"
elif [ "$bench_limit_s" -lt "$BENCH_MIN_S" ]; then
  bench_line="not run (only ${bench_limit_s}s left)"
else
  bench_start=$SECONDS
  within "$bench_limit_s" "$PYTHON" -m bench --device cuda --max-seconds $((bench_limit_s - BENCH_MARGIN_S)) \
    --out "$OUTDIR/GPU_RESULTS.md" > "$OUTDIR/bench.log" 2>&1
  bench_rc=$?
  bench_line="$(describe_rc "$bench_rc") in $((SECONDS - bench_start))s"
  if [ "$bench_rc" -eq 0 ]; then
    cp "$OUTDIR/GPU_RESULTS.md" bench/GPU_RESULTS.md
    bench_line+=": $OUTDIR/GPU_RESULTS.md, copied to bench/GPU_RESULTS.md"
  fi
  bench_line+=" (bench.log)"
fi

test_line=$(tail -n 1 "$OUTDIR/tests.log" 2>/dev/null || true)
verdict=PASS
# A pass needs the CUDA tests to have run, not merely the CPU ones, and the benchmark to have written its table.
{ [ "$build_rc" -eq 0 ] && [ "$test_rc" -eq 0 ] && [ "$with_cuda" = "True" ] && [ "$CARD" != "no CUDA device" ] &&
  [ "$bench_rc" -eq 0 ]; } || verdict=FAIL

# The first errors, so that a failed run can be diagnosed from its console output alone.
[ "$build_rc" -eq 0 ] || grep -m 10 -E "error|Error" "$OUTDIR/build.log"
[ "$test_rc" -le 0 ] || grep -m 20 -E "^(FAILED|ERROR)" "$OUTDIR/tests.log"
[ "$bench_rc" -le 0 ] || tail -n 5 "$OUTDIR/bench.log"

{
  echo
  echo "== jacobian_ext GPU check ($(date -u +%Y-%m-%d)) =="
  printf '%-12s %s\n' "card" "$CARD (arch $TORCH_CUDA_ARCH_LIST)"
  printf '%-12s %s\n' "torch" "$(sed -n 's/^torch //p' "$OUTDIR/environment.txt")"
  printf '%-12s %s\n' "build" "$(describe_rc "$build_rc") in ${build_s}s, WITH_CUDA=$with_cuda (build.log)"
  printf '%-12s %s\n' "tests" "$(describe_rc "$test_rc") in ${test_s}s: $test_line (tests.log)"
  printf '%-12s %s\n' "on CUDA" "$cuda_counts"
  printf '%-12s %s\n' "bench" "$bench_line"
  printf '%-12s %s\n' "result" "$verdict"
} | tee "$OUTDIR/summary.txt"

[ "$verdict" = PASS ]
