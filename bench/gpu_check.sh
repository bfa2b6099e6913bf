#!/usr/bin/env bash
# GPU check for a machine without network access: builds jacobian_ext in place against the torch found
# there (which may be older than ours), runs the test suite (it covers CUDA when a GPU is visible) and
# writes logs to OUTDIR. Ends within about 8 minutes and prints a short summary last.
#
#   bench/gpu_check.sh OUTDIR
#
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: the visible card's
# architecture only, which halves the .cu compile time against a multi-architecture build), MAX_JOBS.
set -uo pipefail

OUTDIR=${1:?usage: bench/gpu_check.sh OUTDIR}
PYTHON=${PYTHON:-python3}
BUILD_TIMEOUT_S=300
TEST_TIMEOUT_S=150

mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())'
  command -v nvcc && nvcc --version | tail -n 2
  echo "ninja: $(ninja --version 2>/dev/null || echo 'not found, setuptools compiles one file at a time')"
  echo "cpus: $(nproc)"
} > "$OUTDIR/environment.txt" 2>&1

CARD=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null || echo "no CUDA device")
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c 'import torch;print(".".join(map(str,torch.cuda.get_device_capability())))' \
    2>/dev/null || echo "8.0;9.0")
fi
export TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-$(nproc)}

# In place (not pip install -e), so nothing outside this folder changes.
build_start=$SECONDS
timeout "$BUILD_TIMEOUT_S" "$PYTHON" setup.py build_ext --inplace > "$OUTDIR/build.log" 2>&1
build_rc=$?
build_s=$((SECONDS - build_start))
with_cuda=$("$PYTHON" -c 'from jacobian_ext import _build_info as b; print(b.WITH_CUDA)' 2>/dev/null || echo "unknown")

test_rc=-1
test_s=0
if [ "$build_rc" -eq 0 ]; then
  test_start=$SECONDS
  timeout "$TEST_TIMEOUT_S" "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider tests \
    --junitxml="$OUTDIR/tests.xml" > "$OUTDIR/tests.log" 2>&1
  test_rc=$?
  test_s=$((SECONDS - test_start))
fi

# Outcome counts of the tests that ran on CUDA (a "cuda" parameter, or tests/test_cuda.py).
cuda_counts=$("$PYTHON" - "$OUTDIR/tests.xml" <<'PY' 2>/dev/null || echo "no results"
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

describe_rc() {  # exit status -> word
  case "$1" in
    0) echo "ok" ;;
    -1) echo "not run" ;;
    124) echo "TIMED OUT" ;;
    *) echo "FAILED (exit $1)" ;;
  esac
}
test_line=$(tail -n 1 "$OUTDIR/tests.log" 2>/dev/null || true)
verdict=PASS
# A pass needs the CUDA tests to have run, not merely the CPU ones.
{ [ "$build_rc" -eq 0 ] && [ "$test_rc" -eq 0 ] && [ "$with_cuda" = "True" ] && [ "$CARD" != "no CUDA device" ]; } ||
  verdict=FAIL

# The first errors, so that a failed run can be diagnosed from its console output alone.
[ "$build_rc" -eq 0 ] || grep -m 10 -E "error|Error" "$OUTDIR/build.log"
[ "$test_rc" -le 0 ] || grep -m 20 -E "^(FAILED|ERROR)" "$OUTDIR/tests.log"

{
  echo
  echo "== jacobian_ext GPU check ($(date -u +%Y-%m-%d)) =="
  printf '%-12s %s\n' "card" "$CARD (arch $TORCH_CUDA_ARCH_LIST)"
  printf '%-12s %s\n' "torch" "$(sed -n 's/^torch //p' "$OUTDIR/environment.txt")"
  printf '%-12s %s\n' "build" "$(describe_rc "$build_rc") in ${build_s}s, WITH_CUDA=$with_cuda (build.log)"
  printf '%-12s %s\n' "tests" "$(describe_rc "$test_rc") in ${test_s}s: $test_line (tests.log)"
  printf '%-12s %s\n' "on CUDA" "$cuda_counts"
  printf '%-12s %s\n' "result" "$verdict"
} | tee "$OUTDIR/summary.txt"

[ "$verdict" = PASS ]
