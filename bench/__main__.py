"""python -m bench [--device cpu|cuda] [--quick] [--cases a,b] [--out PATH] [--memory] [--threads N] [--plot]
                 [--max-seconds S]

Times jacobian_ext against the usual ways of computing per-sample Jacobians on this machine's CPU or GPU
and writes a markdown report (GUIDE.md section 4)."""
import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch

import jacobian_ext as jx

from . import report
from .cases import CASES, DEVICES, SUITE, default_cases
from .floors import measure_rates
from .memory import measure_in_subprocess
from .methods import AUTO, METHODS, available_methods
from .plot import write_plot
from .suite import run_case, warm_up_process
from .timing import FULL, QUICK

BENCH_DIR = Path(__file__).resolve().parent


def parse_arguments(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="where models, inputs and every method run (default %(default)s; cuda leaves out "
                             "the JAX peers, which are CPU only)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: few runs; a call slower than 0.3 s is reported from its first call")
    left_out = {device: [case.name for case in SUITE if case not in default_cases(device)] for device in DEVICES}
    parser.add_argument("--cases", help=f"comma-separated subset of {','.join(CASES)} (default: all" + "".join(
        f" but {','.join(names)} on {device}" for device, names in left_out.items() if names) + ")")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "RESULTS.md",
                        help="markdown report (default %(default)s)")
    parser.add_argument("--memory", action="store_true",
                        help="cpu: also measure peak RSS, one fresh process per method and case (on cuda peak "
                             "memory is always measured, in process)")
    parser.add_argument("--threads", type=int,
                        help="torch.set_num_threads before measuring (default: torch's choice)")
    parser.add_argument("--plot", action="store_true",
                        help="also write a plot beside the report, named after it: RESULTS.md -> results.png "
                             "(needs matplotlib)")
    parser.add_argument("--max-seconds", type=float,
                        help="start no further case once the seconds since start plus the longest case so far "
                             "would pass this; the report names the cases left out (default: no limit)")
    arguments = parser.parse_args(argv)
    if arguments.cases is None:
        arguments.cases = default_cases(arguments.device)
    else:
        unknown = [name for name in arguments.cases.split(",") if name not in CASES]
        if unknown:
            parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
        arguments.cases = [case for case in SUITE if case.name in arguments.cases.split(",")]
    if arguments.device == "cuda":
        problem = cuda_problem()
        if problem:
            parser.error(f"--device cuda: {problem}")
    return arguments


def cuda_problem() -> Optional[str]:
    """Why a CUDA run cannot start here, or None."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device on this machine"
    if not jx.ops.build_info.WITH_CUDA:
        return "jacobian_ext was built without CUDA; rebuild it where nvcc is found (make build)"
    return None


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
    started = time.perf_counter()
    arguments = parse_arguments(argv)
    device = arguments.device
    budget = QUICK if arguments.quick else FULL
    methods = available_methods(device)
    for method in METHODS:
        if method not in methods:
            why = "not installed" if not method.available() else f"runs on {', '.join(method.devices)} only"
            print(f"skipping {method.name}: {why}")
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    threads = torch.get_num_threads()
    if device == "cuda":
        # Full float32 (torch's default, made explicit) for the methods' matmuls and the floors' GEMM rate
        # alike: TF32 times would not be float32 times.
        torch.backends.cuda.matmul.allow_tf32 = False
    print(f"{report.device_name(device)}; torch {torch.__version__}, {threads} threads; "
          f"methods: {', '.join(m.label for m in methods)}")
    rates = measure_rates(device)
    print(f"GEMM {rates.gemm_flops / 1e9:.1f} GFLOP/s, bandwidth {rates.bandwidth / 1e9:.1f} GB/s")
    warm_up_process(methods, CASES["tiny"], device)

    results, not_run = [], []
    longest_case_s = 0.0
    for index, case in enumerate(arguments.cases, 1):
        spent_s = time.perf_counter() - started
        if arguments.max_seconds is not None and spent_s + longest_case_s > arguments.max_seconds:
            not_run = [remaining.name for remaining in arguments.cases[index - 1:]]
            print(f"--max-seconds {arguments.max_seconds:g}: {spent_s:.0f} s spent and the longest case took "
                  f"{longest_case_s:.0f} s; not run: {', '.join(not_run)}", flush=True)
            break
        case_started = time.perf_counter()
        print(f"[{index}/{len(arguments.cases)}] {case.name}: B={case.batch} D={case.in_features} "
              f"hidden {case.hidden_text} C={case.out_features} ...", flush=True)
        result = run_case(case, methods, budget, device)
        results.append(result)
        case_s = time.perf_counter() - case_started
        longest_case_s = max(longest_case_s, case_s)
        print(f"{progress_line(result, methods)}  ({case_s:.0f} s)", flush=True)

    if arguments.memory and device == "cpu":
        for result in results:
            print(f"peak memory: {result.case.name} ...", flush=True)
            for method in methods:
                if method.name not in result.failures:
                    result.peak_memory[method.name] = measure_in_subprocess(result.case.name, method.name, threads)

    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(
        report.render(results, methods, rates, command.strip(), budget.min_runs, device, not_run))
    print(f"wrote {arguments.out}")
    if arguments.plot:
        plot_path = arguments.out.with_name(arguments.out.stem.lower() + ".png")
        if write_plot(results, methods, plot_path, device):
            print(f"wrote {plot_path}")
        else:
            print("no plot: matplotlib is not installed (pip install matplotlib)")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
