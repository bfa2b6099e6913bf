"""python -m bench.small_chain [--cases "pinn;tiny;..."] [--variants kernel=1e12,walker=0] [--rounds 7] [--mode reverse]

A/B micro-benchmark (not a test) of the whole-plan op on chain plans: the small-chain kernel
(csrc/cpu/small_chain.cpp) against the ATen walker, or one build against another. Each variant runs in
its own worker process: NAME=LIMIT sets JACEXT_SMALL_CHAIN_MAX_MACS (read once per process; empty for the
default), NAME=LIMIT@DIR imports jacobian_ext from DIR instead of this checkout (a copy of another build).
The driver alternates between the workers round by round, so machine noise hits every variant alike, and
prints per case the median time per call of each variant and each one's ratio to the first.

Cases are separated by ';'. A case is a bench/cases.py name, optionally with ':batch' (as
bench.op_latency takes them), or mlp:B:D:H1,H2..:C:ACTIVATION, e.g. mlp:1024:2:64,64,64:1:tanh (ACTIVATION:
a key of ACTIVATIONS)."""
import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

from .workers import Workers

# wall: time.perf_counter; cpu: the process's CPU time, which a loaded machine disturbs less (with
# --threads 1 it is the call's own compute time; with more threads it also counts OpenMP's spin-waiting).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid}


def build(spec: str):
    """(input, layers, params) of the op for a case spec."""
    from .op_latency import build as build_case, encode

    if not spec.startswith("mlp:"):
        return build_case(spec)
    _, batch, in_features, hidden, out_features, activation = spec.split(":")
    widths = [int(in_features), *(int(width) for width in hidden.split(",") if width), int(out_features)]
    torch.manual_seed(0)
    layers = []
    for index in range(len(widths) - 1):
        layers.append(nn.Linear(widths[index], widths[index + 1]))
        if index < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    model = nn.Sequential(*layers).eval()
    # encode names an activation by its class; the op's names are the same lower-cased.
    return (torch.randn(int(batch), widths[0], generator=torch.Generator().manual_seed(1)), *encode(model))


def worker(build_dir: str, threads: int):
    """Answers requests {"case", "mode", "seconds", "clock"} on stdin with the median seconds per call of
    repeated blocks of calls filling about `seconds` of that clock."""
    if build_dir:
        sys.path.insert(0, build_dir)
    import jacobian_ext  # noqa: F401  (registers torch.ops.jacext)

    if threads:
        torch.set_num_threads(threads)
    op = torch.ops.jacext.batch_jacobian.default
    cases = {}
    for line in sys.stdin:
        request = json.loads(line)
        key = (request["case"], request["mode"])
        with torch.no_grad(), torch._C._AutoDispatchBelowAutograd():
            if key not in cases:
                x, layers, params = build(request["case"])
                args = (x, layers, params, request["mode"])
                start = time.perf_counter()
                op(*args)  # warm-up: allocator, threads
                calls = max(1, int(0.01 / max(time.perf_counter() - start, 1e-7)))
                cases[key] = (args, calls)
            args, calls = cases[key]
            clock = CLOCKS[request["clock"]]
            blocks = []
            deadline = clock() + request["seconds"]
            while not blocks or clock() < deadline:
                start = clock()
                for _ in range(calls):
                    op(*args)
                blocks.append((clock() - start) / calls)
        print(json.dumps(statistics.median(blocks)), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.small_chain", description=__doc__.split("\n\n")[1])
    parser.add_argument("--cases", default="pinn;tiny;small")
    parser.add_argument("--variants", default="kernel=1e12,walker=0", help="NAME=LIMIT[@DIR],... (default %(default)s)")
    parser.add_argument("--mode", default="reverse", choices=("forward", "reverse"))
    parser.add_argument("--rounds", type=int, default=7, help="alternations between the variants")
    parser.add_argument("--seconds", type=float, default=0.1, help="timed seconds per variant per round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the workers (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=tuple(CLOCKS))
    arguments = parser.parse_args(argv)
    arguments_of, environments = {}, {}
    for variant in arguments.variants.split(","):
        name, _, setting = variant.partition("=")
        limit, _, build_dir = setting.partition("@")
        env = dict(os.environ)
        env.pop("JACEXT_SMALL_CHAIN_MAX_MACS", None)
        if limit:
            env["JACEXT_SMALL_CHAIN_MAX_MACS"] = limit
        arguments_of[name], environments[name] = [build_dir, str(arguments.threads)], env
    names = list(arguments_of)
    threads = arguments.threads or torch.get_num_threads()
    print(f"{arguments.mode} mode, {arguments.clock} clock, torch threads {threads}, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print("| case | " + " | ".join(f"{name} (us)" for name in names) + " | "
          + " | ".join(f"{name} / {names[0]}" for name in names[1:]) + " |")
    print("|" + " --- |" * (1 + 2 * len(names) - 1))
    with Workers("bench.small_chain", arguments_of, environments) as workers:
        for case in arguments.cases.split(";"):
            samples = {name: [] for name in names}
            for round_index in range(arguments.rounds + 1):  # round 0 builds and warms up
                for name in names:
                    answer = workers.ask(name, {"case": case, "mode": arguments.mode, "seconds": arguments.seconds,
                                                "clock": arguments.clock})
                    if round_index > 0:
                        samples[name].append(answer)
            medians = {name: statistics.median(samples[name]) for name in names}
            print(f"| {case} | " + " | ".join(f"{medians[name] * 1e6:.1f}" for name in names) + " | "
                  + " | ".join(f"{medians[name] / medians[names[0]]:.2f}" for name in names[1:]) + " |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], int(sys.argv[3]))
    else:
        main()
