"""Per-call time of the whole-plan op alone on chain plans: the C++ side of a call, no Python planning.

Calls `torch.ops.jacext.batch_jacobian.default` below autograd (as jacobian_ext does under no_grad)
back to back and prints one JSON line {case: median microseconds per call over the blocks}. For A/B
comparisons run it in alternating fresh processes against each build (PYTHONPATH picks the build).

    python -m bench.op_latency --threads 1 --mode reverse --cases tiny,small,relu16
    python -m bench.op_latency --cases small:1,small:4,wide784 --env JACEXT_SMALL_CHAIN_MAX_MACS=0

A case is a bench/cases.py name, optionally with ':batch', or one of EXTRA below.
"""
import argparse
import json
import statistics
import time

import torch

import jacobian_ext  # noqa: F401  (registers torch.ops.jacext)

from .cases import CASES, Case, build_input, build_model

EXTRA = {
    # The fixed cost of any call: one activation, no Linear.
    "relu16": None,
    # A 784-wide input at B=1 (MNIST-sized first layer) with a small classifier behind it.
    "wide784": Case("wide784", 1, 784, (128, 128), 10, softmax_head=True),
}


def encode(model):
    """The op's (layers, params) for an nn.Sequential of Linear, ReLU/Tanh and Softmax."""
    layers, params = [], []
    for module in model:
        if isinstance(module, torch.nn.Linear):
            layers.append("linear")
            params += [module.weight.detach(), module.bias.detach()]
        elif isinstance(module, torch.nn.Softmax):
            layers.append("softmax")
        else:
            layers.append(type(module).__name__.lower())
    return layers, params


def build(spec: str):
    name, _, batch = spec.partition(":")
    if name == "relu16":
        return torch.randn(1, 16), ["relu"], []
    case = EXTRA.get(name) or CASES[name]
    if batch:
        case = Case(case.name, int(batch), case.in_features, case.hidden, case.out_features, case.activation,
                    case.softmax_head)
    layers, params = encode(build_model(case))
    return build_input(case), layers, params


def median_call_us(op_args, calls: int, blocks: int) -> float:
    op = torch.ops.jacext.batch_jacobian.default
    times = []
    with torch.no_grad(), torch._C._AutoDispatchBelowAutograd():
        for _ in range(calls):
            op(*op_args)
        for _ in range(blocks):
            start = time.perf_counter()
            for _ in range(calls):
                op(*op_args)
            times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.op_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="tiny,small,relu16")
    parser.add_argument("--mode", default="reverse", choices=("forward", "reverse"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--blocks", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    for spec in args.cases.split(","):
        x, layers, params = build(spec)
        calls = max(20, args.calls // max(1, x.shape[0]))
        results[spec] = round(median_call_us((x, layers, params, args.mode), calls, args.blocks), 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
