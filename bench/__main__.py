"""python -m bench [--quick] [--cases a,b] [--out PATH] [--memory] [--threads N] [--plot]

Times jacobian_ext against the usual ways of computing per-sample Jacobians on this machine's CPU
and writes a markdown report (GUIDE.md section 4)."""
import argparse
import sys
import time
from pathlib import Path

import torch

from . import report
from .cases import CASES, SUITE
from .floors import measure_rates
from .memory import measure_in_subprocess
from .methods import AUTO, METHODS, available_methods
from .plot import write_plot
from .suite import run_case, warm_up_process
from .timing import FULL, QUICK

BENCH_DIR = Path(__file__).resolve().parent


def parse_arguments(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: few runs; a call slower than 0.3 s is reported from its first call")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "RESULTS.md",
                        help="markdown report (default %(default)s)")
    parser.add_argument("--memory", action="store_true",
                        help="also measure peak RSS, one fresh process per method and case")
    parser.add_argument("--threads", type=int,
                        help="torch.set_num_threads before measuring (default: torch's choice)")
    parser.add_argument("--plot", action="store_true",
                        help="also write results.png beside the report (needs matplotlib)")
    arguments = parser.parse_args(argv)
    unknown = [name for name in arguments.cases.split(",") if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    arguments.cases = [case for case in SUITE if case.name in arguments.cases.split(",")]
    return arguments


def progress_line(result, methods) -> str:
    case = result.case
    ours = result.seconds(AUTO)
    best = report.fastest_peer(result, methods)
    text = f"ours (auto, {result.auto_mode}) {report.format_seconds(ours)}"
    if best and ours:
        text += f"; fastest peer {best[0]} {report.format_seconds(best[1])} -> {report.format_ratio(best[1] / ours)}"
    if result.failures:
        text += f"; not timed: {', '.join(f'{name} {why}' for name, why in result.failures.items())}"
    return f"    {case.name}: {text}"


def main(argv=None):
    arguments = parse_arguments(argv)
    budget = QUICK if arguments.quick else FULL
    methods = available_methods()
    missing = [m.name for m in METHODS if m not in methods]
    if missing:
        print(f"skipping {', '.join(missing)}: not installed")
    started = time.perf_counter()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; methods: {', '.join(m.label for m in methods)}")
    rates = measure_rates()
    print(f"GEMM {rates.gemm_flops / 1e9:.1f} GFLOP/s, bandwidth {rates.bandwidth / 1e9:.1f} GB/s")
    warm_up_process(methods, CASES["tiny"])

    results = []
    for index, case in enumerate(arguments.cases, 1):
        case_started = time.perf_counter()
        print(f"[{index}/{len(arguments.cases)}] {case.name}: B={case.batch} D={case.in_features} "
              f"hidden {case.hidden_text} C={case.out_features} ...", flush=True)
        result = run_case(case, methods, budget)
        results.append(result)
        print(f"{progress_line(result, methods)}  ({time.perf_counter() - case_started:.0f} s)", flush=True)

    if arguments.memory:
        for result in results:
            print(f"peak memory: {result.case.name} ...", flush=True)
            for method in methods:
                if method.name not in result.failures:
                    result.peak_rss[method.name] = measure_in_subprocess(result.case.name, method.name, threads)

    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(report.render(results, methods, rates, command.strip(), budget.min_runs))
    print(f"wrote {arguments.out}")
    if arguments.plot:
        plot_path = arguments.out.with_name("results.png")
        if write_plot(results, methods, plot_path):
            print(f"wrote {plot_path}")
        else:
            print("no plot: matplotlib is not installed (pip install matplotlib)")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
