"""python -m bench.explain [--quick] [--out PATH]

Attributions for every class: jacobian_ext.explain (all classes in one sweep) against Captum looping over
the targets, in the same process, interleaved runs (bench/timing.py), medians; and single-target Saliency
against Captum's. Writes a markdown table (default bench/EXPLAIN.md). Needs captum."""
import argparse
import datetime
import os
import platform
import statistics
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict

import torch
from torch import nn

from jacobian_ext import explain

from .report import cpu_model
from .timing import FULL, QUICK, time_interleaved, timed_call

IG_STEPS = 32


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], nn.Module]
    in_shape: tuple
    batch: int
    classes: int


def mlp(classes):
    return lambda: nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, classes), nn.Softmax(dim=1))


def cnn(classes):
    return lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Flatten(), nn.Linear(32 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, classes))


CASES = [
    Case("mlp C=10 (784-256-256-10, softmax)", mlp(10), (784,), 16, 10),
    Case("mlp C=100 (784-256-256-100, softmax)", mlp(100), (784,), 16, 100),
    Case("cnn C=10 (3x32x32, 2 conv, 2 linear)", cnn(10), (3, 32, 32), 4, 10),
    Case("cnn C=100 (3x32x32, 2 conv, 2 linear)", cnn(100), (3, 32, 32), 4, 100),
]


def runners(case: Case, x: torch.Tensor, model: nn.Module) -> Dict[str, Dict[str, Callable]]:
    """Per question, {method: call}."""
    from captum.attr import IntegratedGradients, Saliency

    ours_saliency, ours_ig = explain.Saliency(model), explain.IntegratedGradients(model)
    captum_saliency, captum_ig = Saliency(model), IntegratedGradients(model)
    targets = range(case.classes)
    return {
        "saliency, all classes": {
            "ours": lambda: ours_saliency.attribute(x, target=explain.all_classes, abs=False),
            "captum": lambda: torch.stack([captum_saliency.attribute(x, target=k, abs=False) for k in targets], 1),
        },
        f"integrated gradients (n_steps={IG_STEPS}), all classes": {
            "ours": lambda: ours_ig.attribute(x, target=explain.all_classes, n_steps=IG_STEPS),
            "captum": lambda: torch.stack([captum_ig.attribute(x, target=k, n_steps=IG_STEPS) for k in targets], 1),
        },
        "saliency, one target": {
            "ours": lambda: ours_saliency.attribute(x, target=1),
            "captum": lambda: captum_saliency.attribute(x, target=1),
        },
    }


def run(cases, budget):
    rows = []
    for case in cases:
        torch.manual_seed(0)
        model = case.make().eval()
        x = torch.randn(case.batch, *case.in_shape)
        for question, methods in runners(case, x, model).items():
            first, results = {}, {}
            for name, call in methods.items():
                call()  # plans, caches, first-touch of buffers: not what a steady caller pays
                results[name], first[name] = timed_call(call, "cpu")
            scale = results["captum"].abs().max().item()
            error = (results["ours"] - results["captum"]).abs().max().item() / max(scale, 1e-30)
            timings = time_interleaved(methods, first, budget, "cpu")
            ours, theirs = (statistics.median(timings[name].samples) for name in ("ours", "captum"))
            rows.append((case, question, ours, theirs, error, len(timings["ours"].samples)))
            print(f"{case.name:<40} {question:<45} ours {ours * 1e3:9.2f} ms  captum {theirs * 1e3:9.2f} ms  "
                  f"{theirs / ours:6.2f}x  rel. error {error:.1e}", file=sys.stderr, flush=True)
    return rows


def markdown(rows, budget_name):
    import captum

    lines = [
        "# Attributions for every class: jacobian_ext.explain vs Captum (CPU)",
        "",
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {cpu_model()}, {os.cpu_count()} cores, "
        f"torch.get_num_threads() = {torch.get_num_threads()}, torch {torch.__version__}, captum {captum.__version__}, "
        f"Python {platform.python_version()}; load average at the end {os.getloadavg()[0]:.1f} (other jobs on the "
        f"machine); `python -m bench.explain{' --quick' if budget_name == 'quick' else ''}"
        f"{' --threads %d' % torch.get_num_threads() if torch.get_num_threads() == 1 else ''}`; "
        "float32, random weights, eval mode. Captum loops over the targets (one call per class); ours computes "
        "the rows of all classes in one sweep (`target=explain.all_classes`). Median of interleaved runs; the last column is "
        "Captum's time over ours (above 1 we are faster); the error is the largest difference to Captum's "
        "result relative to its largest entry.",
        "",
        "| case | B | attribution | ours | Captum | Captum / ours | rel. error |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for case, question, ours, theirs, error, _ in rows:
        lines.append(f"| {case.name} | {case.batch} | {question} | {ours * 1e3:.2f} ms | {theirs * 1e3:.2f} ms | "
                     f"{theirs / ours:.2f}× | {error:.0e} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.explain", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke test of the script)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "EXPLAIN.md"))
    parser.add_argument("--cases", help="comma-separated case numbers (0-based), default all")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    arguments = parser.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)  # Captum: "Input Tensor 0 did not already require gradients"
    budget = QUICK if arguments.quick else FULL
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    cases = CASES if not arguments.cases else [CASES[int(i)] for i in arguments.cases.split(",")]
    rows = run(cases, budget)
    Path(arguments.out).write_text(markdown(rows, "quick" if arguments.quick else "full"))
    print(f"wrote {arguments.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
