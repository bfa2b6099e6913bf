"""Hot-loop latency of the latency cases: each method called back to back, as a serving loop calls it.

The suite (`python -m bench`) times every call right after another method's call, so a microsecond-scale
call always starts with caches and thread pools left in another library's state; that is the right
measure for a mixed workload and a pessimistic one for a loop that only computes Jacobians. Here each
method runs blocks of `--calls` calls in a row; the blocks of all methods are interleaved (so machine
noise hits every method alike), and each method's time is the median over its blocks of the mean call
time in the block.

    python -m bench.latency                      # linear, tiny and small, 2 threads; writes bench/LATENCY.md
    python -m bench.latency --cases tiny --threads 1 --out /tmp/latency.md
"""
import argparse
import platform
import statistics
import time
from datetime import datetime
from pathlib import Path

import torch

from .cases import CASES, build_model_and_input
from .methods import AUTO, available_methods
from .report import format_seconds

BENCH_DIR = Path(__file__).resolve().parent


def block_seconds(run, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        run()  # ours enters torch.no_grad() itself (methods.py); the autograd peers need grad mode
    return (time.perf_counter() - start) / calls


def measure(case_name: str, calls: int, blocks: int):
    """{method label: median seconds per call} for one case."""
    model, x = build_model_and_input(CASES[case_name], "cpu")
    runners = {method.label: method.prepare(model, x) for method in available_methods("cpu")}
    for run in runners.values():
        block_seconds(run, max(1, calls // 10))  # warm-up: compilation, plans, allocator
    samples = {label: [] for label in runners}
    for _ in range(blocks):
        for label, run in runners.items():
            samples[label].append(block_seconds(run, calls))
    return {label: statistics.median(values) for label, values in samples.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="linear,tiny,small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200, help="calls per block")
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "LATENCY.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    for name in args.cases.split(","):
        print(f"{name} ...", flush=True)
        results[name] = measure(name, args.calls, args.blocks)
    labels = list(next(iter(results.values())))
    ours = next(method.label for method in available_methods("cpu") if method.name == AUTO)
    lines = [
        "# Hot-loop latency", "",
        f"`python -m bench.latency --cases {args.cases} --threads {args.threads} --calls {args.calls} "
        f"--blocks {args.blocks}`", "",
        f"- Date: {datetime.now():%Y-%m-%d %H:%M}; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {args.threads} threads", "",
        "Median over interleaved blocks of the mean time per call in a block of back-to-back calls; ours under "
        "torch.no_grad(). `x` columns: that method's time over ours (above 1 we are faster).", "",
        "| case | " + " | ".join(labels) + " | " + " | ".join(f"{label} / ours" for label in labels if label != ours)
        + " |",
        "| --- " * (1 + 2 * len(labels) - 1) + "|",
    ]
    for name, times in results.items():
        cells = [format_seconds(times[label]) for label in labels]
        cells += [f"{times[label] / times[ours]:.2f}x" for label in labels if label != ours]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(results) - 2:]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
