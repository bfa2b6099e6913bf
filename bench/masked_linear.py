"""python -m bench.masked_linear [--case mnist] [--fractions 0.2,0.5,0.8] [--rounds 7] [--runs 5] [--dtype float32]
                               [--threads N] [--mode reverse|forward] [--branches dense,masked]

Micro-benchmark (not a test): the Jacobian (reverse or forward sweep) of a suite case's model with its ReLU biases
shifted so that a given fraction of hidden units is active, computed by each branch: the dense GEMM chain, the
masked kernel that skips inactive units (sequential.cpp, skip_inactive_units), or the masked kernel's copy for one
instruction set (masked-baseline, masked-avx2, masked-avx512; masked_linear.h). Each branch runs in its own worker
process, forced by JACEXT_MASKED_LINEAR_CROSSOVER and JACEXT_ROW_PRODUCT_ISA (read once per process); the driver
alternates between the workers round by round, so machine noise hits all alike, and prints the median time per
call of each and the first branch's over each other's: wall time, and the process's CPU time, which a loaded
machine disturbs less (with --threads 1 it is the call's own compute time; with more threads it also counts
OpenMP's spin-waiting)."""
import argparse
import json
import os
import statistics
import sys
import time

import torch

from .workers import Workers

BRANCHES = {
    "dense": {"JACEXT_MASKED_LINEAR_CROSSOVER": "0"},
    "masked": {"JACEXT_MASKED_LINEAR_CROSSOVER": "2"},
    **{f"masked-{isa}": {"JACEXT_MASKED_LINEAR_CROSSOVER": "2", "JACEXT_ROW_PRODUCT_ISA": isa}
       for isa in ("baseline", "avx2", "avx512")},
}


def shifted_model(case_name: str, active_fraction: float, dtype: torch.dtype, seed: int = 0):
    """The case's model (PyTorch's default init) with each hidden unit's bias set so that it is active
    on `active_fraction` of the inputs of a calibration batch; returns (model, input batch)."""
    from bench.cases import CASES, build_model

    case = CASES[case_name]
    model = build_model(case, seed).to(dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn(max(case.batch, 256), case.in_features, generator=generator, dtype=dtype)
    x = hidden[: case.batch]
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for linear in linears[:-1]:
            pre = hidden @ linear.weight.T
            linear.bias.copy_(-torch.quantile(pre.double(), 1.0 - active_fraction, dim=0).to(dtype))
            hidden = torch.relu(pre + linear.bias)
    return model, x


def active_fraction_of(model, x) -> float:
    active = total = 0
    with torch.no_grad():
        for layer in model:
            x = layer(x)
            if isinstance(layer, torch.nn.ReLU):
                active += (x > 0).sum().item()
                total += x.numel()
    return active / total


def worker(threads):
    """Reads requests {"case", "fraction", "dtype", "runs", "mode"} from stdin, answers seconds per call."""
    import jacobian_ext as jx

    if threads:
        torch.set_num_threads(threads)
    models = {}
    for line in sys.stdin:
        request = json.loads(line)
        key = (request["case"], request["fraction"], request["dtype"], request["mode"])
        if key not in models:
            model, x = shifted_model(request["case"], request["fraction"], getattr(torch, request["dtype"]))
            compiled = jx.compile(model, mode=request["mode"])
            with torch.no_grad():
                compiled(x)  # warm-up: plan, allocator, threads
            models[key] = (compiled, x, active_fraction_of(model, x))
        compiled, x, active = models[key]
        samples, cpu_samples = [], []
        with torch.no_grad():
            for _ in range(request["runs"]):
                start, cpu_start = time.perf_counter(), time.process_time()
                compiled(x)
                samples.append(time.perf_counter() - start)
                cpu_samples.append(time.process_time() - cpu_start)
        print(json.dumps({"samples": samples, "cpu_samples": cpu_samples, "active": active}), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.masked_linear", description=__doc__.split("\n\n")[1])
    parser.add_argument("--case", default="mnist", help="suite case whose shape is used (default %(default)s)")
    parser.add_argument("--fractions", default="0.2,0.5,0.8", help="active fractions (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=7, help="alternations between the branches")
    parser.add_argument("--runs", type=int, default=5, help="timed calls per branch per round")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the workers (default: torch's)")
    parser.add_argument("--mode", default="reverse", choices=["reverse", "forward"], help="the sweep timed")
    parser.add_argument("--branches", default="dense,masked",
                        help=f"comma-separated, the first the reference (default %(default)s; "
                             f"any of {', '.join(BRANCHES)})")
    arguments = parser.parse_args(argv)
    fractions = [float(f) for f in arguments.fractions.split(",")]
    names = arguments.branches.split(",")
    unknown = [name for name in names if name not in BRANCHES]
    if unknown or len(names) < 2:
        parser.error(f"--branches: two or more of {', '.join(BRANCHES)}, got {arguments.branches!r}")
    threads = arguments.threads or torch.get_num_threads()
    print(f"case {arguments.case}, {arguments.mode} sweep, {arguments.dtype}, torch threads {threads}, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    reference, others = names[0], names[1:]
    header = (["active (target)", "active (measured)"] + names + [f"{reference} / {name}" for name in others]
              + [f"{reference} / {name} (CPU)" for name in others])
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    with Workers("bench.masked_linear", {name: [str(arguments.threads)] for name in names},
                 {name: dict(os.environ, **BRANCHES[name]) for name in names}) as workers:
        for fraction in fractions:
            samples = {name: [] for name in names}
            cpu_samples = {name: [] for name in names}
            active = None
            for round_index in range(arguments.rounds + 1):  # round 0 builds and warms up
                for name in names:
                    answer = workers.ask(name, {"case": arguments.case, "fraction": fraction,
                                                "dtype": arguments.dtype, "runs": arguments.runs,
                                                "mode": arguments.mode})
                    active = answer["active"]
                    if round_index > 0:
                        samples[name] += answer["samples"]
                        cpu_samples[name] += answer["cpu_samples"]
            wall = {name: statistics.median(samples[name]) for name in names}
            cpu = {name: statistics.median(cpu_samples[name]) for name in names}
            cells = ([f"{fraction:.0%}", f"{active:.1%}"] + [f"{wall[name] * 1e3:.2f} ms" for name in names]
                     + [f"{wall[reference] / wall[name]:.2f}x" for name in others]
                     + [f"{cpu[reference] / cpu[name]:.2f}x" for name in others])
            print("| " + " | ".join(cells) + " |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]))
    else:
        main()
