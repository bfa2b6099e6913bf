"""One engine, measured as users call it: does the way a model is written change the speed?

Cases (float32, CPU; every ratio measured side by side in one process, interleaved, bench/timing.py):
- the mnist MLP (784-512-512-10, B=256) as an nn.Sequential, as an nn.Module subclass calling F.relu,
  and as a lambda over the Sequential, each through jx.compile; and jx.batch_jacobian(subclass, x)
  called repeatedly (its cached plan);
- resnet18 (torchvision, random weights, 10 classes, eval mode; B=8, 32x32): jx.batch_jacobian called
  repeatedly, jx.compile's module, and torch.func's vmap(jacrev);
- peak RSS growth of one resnet18 Jacobian per method, each in a fresh process (bench/memory.py's way).

    python -m bench.engine                 # writes bench/ENGINE.md
    python -m bench.engine --quick --out /tmp/engine.md
"""
import argparse
import json
import platform
import statistics
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import jacobian_ext as jx

from .memory import REPO_ROOT, _peak_rss_bytes
from .timing import FULL, QUICK, time_interleaved, timed_call

BENCH_DIR = Path(__file__).resolve().parent


class SubclassedMLP(nn.Module):
    def __init__(self, sequential: nn.Sequential):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = sequential[0], sequential[2], sequential[4]

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def mlp_case():
    torch.manual_seed(0)
    sequential = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    x = torch.randn(256, 784)
    subclassed = SubclassedMLP(sequential)
    methods = {
        "Sequential, jx.compile": jx.compile(sequential),
        "subclass, jx.compile": jx.compile(subclassed),
        "lambda, jx.compile": jx.compile(lambda t: sequential(t)),
        "subclass, jx.batch_jacobian": lambda t: jx.batch_jacobian(subclassed, t),
    }
    return "mnist MLP 784-512-512-10, B=256", x, methods, "Sequential, jx.compile"


def resnet18_model():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def resnet_methods(model):
    def single(sample):
        return model(sample.unsqueeze(0)).squeeze(0)

    return {
        "jx.batch_jacobian (repeat call)": lambda t: jx.batch_jacobian(model, t),
        "jx.compile": jx.compile(model),
        "vmap(jacrev)": torch.func.vmap(torch.func.jacrev(single)),
    }


def resnet_case():
    model = resnet18_model()
    x = torch.randn(8, 3, 32, 32)
    return "resnet18 (10 classes), B=8, 3x32x32", x, resnet_methods(model), "vmap(jacrev)"


def measure(case, budget):
    title, x, methods, baseline = case
    runners, first = {}, {}
    reference = None
    with torch.no_grad():
        for name, method in methods.items():
            run = (lambda m=method: m(x))
            result, first[name] = timed_call(run, "cpu")
            jacobian = result[1] if isinstance(result, tuple) else result
            if reference is None:
                reference = jacobian
            error = (jacobian - reference).abs().max().item() / max(reference.abs().max().item(), 1e-30)
            if error > 1e-3:
                raise AssertionError(f"{title}: {name} disagrees with {next(iter(methods))} ({error:.2e} relative)")
            runners[name] = run
        timings = time_interleaved(runners, first, budget, "cpu")
    medians = {name: statistics.median(t.samples) for name, t in timings.items()}
    return title, medians, baseline


def peak_rss_child(method_name: str):
    """In a fresh process: peak RSS growth of one resnet18 Jacobian by `method_name`."""
    torch.set_num_threads(torch.get_num_threads())
    model = resnet18_model()
    x = torch.randn(8, 3, 32, 32)
    method = resnet_methods(model)[method_name]
    with torch.no_grad():
        model(x)  # the thread pool and the allocator, which no method should be charged for
        baseline = _peak_rss_bytes()
        method(x)
    print(json.dumps({"peak_rss_growth_bytes": _peak_rss_bytes() - baseline}))


def peak_rss(method_name: str):
    completed = subprocess.run([sys.executable, "-m", "bench.engine", "--peak-rss", method_name], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=600)
    if completed.returncode != 0:
        return None
    return json.loads(completed.stdout.strip().splitlines()[-1])["peak_rss_growth_bytes"]


def report(results, memory) -> str:
    lines = [
        "# One engine: the same model written differently, and resnet18",
        "",
        f"{datetime.now():%Y-%m-%d %H:%M}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, float32, CPU. "
        "Median seconds per call, methods interleaved in one process (`python -m bench.engine`).",
        "Targets (issue \"One engine\"): the subclass and the lambda within 1.05x of the Sequential; the repeat",
        "batch_jacobian call within 1.1x of the compiled call; resnet18 at least 1.5x faster than vmap(jacrev)",
        "with a lower peak memory. Before the engine (the issue, measured on main on an earlier day, B=256 MLP): the subclass ran",
        "73.9 ms against 37.7 ms for the Sequential, and batch_jacobian re-traced resnet18 on every call.",
        "",
    ]
    for title, medians, baseline in results:
        lines += [f"## {title}", "", f"| method | median | {baseline} / method |", "| --- | --- | --- |"]
        for name, seconds in medians.items():
            lines.append(f"| {name} | {seconds * 1e3:.2f} ms | {medians[baseline] / seconds:.2f}x |")
        lines.append("")
    if memory:
        lines += ["## Peak RSS growth of one resnet18 Jacobian (fresh process per method)", "",
                  "| method | peak RSS growth |", "| --- | --- |"]
        for name, grown in memory.items():
            lines.append(f"| {name} | {'failed' if grown is None else f'{grown / 2**20:.0f} MiB'} |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short timing budget (a smoke run)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "ENGINE.md")
    parser.add_argument("--peak-rss", metavar="METHOD", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_rss:
        return peak_rss_child(args.peak_rss)
    budget = QUICK if args.quick else FULL
    results = []
    for build in (mlp_case, resnet_case):
        results.append(measure(build(), budget))
        print(report(results, {}), flush=True)
    memory = {name: peak_rss(name) for name in resnet_methods(resnet18_model())}
    text = report(results, memory)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
