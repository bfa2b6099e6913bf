"""Time of one Jacobian call on each deployment path against eager jx.compile, interleaved in one process:

    python -m bench.deploy [--out bench/DEPLOY.md]

Paths: eager `jx.compile(model)`, `torch.compile(jm, fullgraph=True)` (inductor), the exported program
(`torch.export`, dynamic batch, run through `.module()`), TorchScript (`torch.jit.script(jm)`), and the op
called directly (`torch.ops.jacext.batch_jacobian`, the floor of the Python paths). All under
torch.no_grad(), float32, on the CPU; the traced paths are checked against eager before timing.
"""
import argparse
import datetime
import platform
import statistics

import torch
from torch import nn

import jacobian_ext as jx
from jacobian_ext import deploy

from .timing import FULL, seconds_of, time_interleaved

CASES = {  # name: (batch, widths); ReLU between Linears, softmax head
    "tiny": (1, [16, 64, 64, 4]),
    "small": (8, [64, 128, 128, 10]),
    "mnist": (256, [784, 512, 512, 10]),
}


def model_of(widths):
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(fan_in, fan_out)] + ([nn.ReLU()] if i < len(widths) - 2 else [nn.Softmax(-1)])
    return nn.Sequential(*layers).eval()


def runners_for(batch, widths):
    model = model_of(widths)
    x = torch.randn(batch, widths[0])
    jm = jx.compile(model)
    encoding = jm.fused_encoding(x)
    params = deploy.read_params(jm.parameter_owner, encoding)
    compiled = torch.compile(jm, fullgraph=True)
    example = torch.randn(2, widths[0])  # export specialises a batch of 1 to a constant
    program = torch.export.export(jm, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}).module()
    scripted = torch.jit.script(jm)
    return x, {
        "eager jx.compile": lambda: jm(x),
        "torch.compile": lambda: compiled(x),
        "torch.export": lambda: program(x),
        "TorchScript": lambda: scripted(x),
        "op directly": lambda: torch.ops.jacext.batch_jacobian(x, list(encoding.layers), params, encoding.mode),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="also write the table as markdown to this file")
    arguments = parser.parse_args()
    torch.manual_seed(0)
    lines = [
        "# Deployment paths: time per call",
        "",
        f"`python -m bench.deploy`, {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, float32, CPU, under torch.no_grad(). Median of "
        "interleaved runs after warm-up; last column: eager time over the path's (above 1: the path is faster).",
        "",
        "| case | path | time | eager / path |",
        "| --- | --- | --- | --- |",
    ]
    with torch.no_grad():
        for name, (batch, widths) in CASES.items():
            print(f"{name}: compiling the paths...", flush=True)
            x, runners = runners_for(batch, widths)
            expected = runners["eager jx.compile"]()[1]
            first_call_s = {}
            for path, run in runners.items():
                first_call_s[path] = seconds_of(run, "cpu")
                torch.testing.assert_close(run()[1], expected, rtol=1e-5, atol=1e-6)
            timings = time_interleaved(runners, first_call_s, FULL, "cpu")
            medians = {path: statistics.median(t.samples) for path, t in timings.items()}
            for path, seconds in medians.items():
                lines.append(f"| {name} (B={batch}, {'-'.join(map(str, widths))}) | {path} | {seconds * 1e6:,.0f} µs | "
                             f"{medians['eager jx.compile'] / seconds:.2f}× |")
    text = "\n".join(lines) + "\n"
    print(text)
    if arguments.out:
        with open(arguments.out, "w") as file:
            file.write(text)


if __name__ == "__main__":
    main()
