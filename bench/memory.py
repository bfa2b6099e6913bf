"""Peak memory of one method on one case: on a GPU the growth of the CUDA allocator's peak in process, on
a CPU the growth of peak RSS in a fresh process.

`python -m bench.memory CASE METHOD THREADS` builds the model, input and method, records the peak
RSS, runs the method once and prints the growth in bytes. A fresh process per measurement, because the peak
only ever rises: in a shared process every method would inherit the peak of the ones before it. The CUDA
allocator's peak can be reset, so there one process serves every method.
"""
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from .cases import CASES, build_model_and_input
from .methods import METHODS_BY_NAME

REPO_ROOT = Path(__file__).resolve().parent.parent


def _peak_rss_bytes() -> int:
    """VmHWM where Linux has it: ru_maxrss survives fork and exec, so a child of the (large) benchmark
    process would start at its parent's peak and show no growth at all."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def measure_in_subprocess(case_name: str, method_name: str, threads: int, timeout_s: float = 300) -> Optional[int]:
    """Growth of peak RSS in bytes, or None when the child failed or ran out of time."""
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "bench.memory", case_name, method_name, str(threads)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return None
    if completed.returncode != 0:
        return None
    return json.loads(completed.stdout.strip().splitlines()[-1])["peak_rss_growth_bytes"]


def cuda_peak_growth(run: Callable[[], object]) -> Optional[int]:
    """Bytes the CUDA allocator's peak rose above what was allocated before one call of run, or None when
    the call failed: one method running out of memory must not end the run."""
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    try:
        run()
    except Exception:
        return None
    return torch.cuda.max_memory_allocated() - baseline


def main(case_name: str, method_name: str, threads: str):
    torch.set_num_threads(int(threads))
    case = CASES[case_name]
    model, x = build_model_and_input(case, "cpu")
    run = METHODS_BY_NAME[method_name].prepare(model, x)
    with torch.no_grad():
        model(x)  # starts the thread pool and the allocator, which no method should be charged for
    baseline = _peak_rss_bytes()
    run()
    print(json.dumps({"peak_rss_growth_bytes": _peak_rss_bytes() - baseline}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
