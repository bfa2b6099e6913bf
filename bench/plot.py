"""The plot beside the report (bench/results.png): time per case per method on a log scale, when matplotlib
is installed."""
from pathlib import Path
from typing import List

from .methods import Method
from .report import KIND_OF_DEVICE
from .suite import CaseResult


def write_plot(results: List[CaseResult], methods: List[Method], path: Path, device: str) -> bool:
    """Writes the plot; False (and nothing written) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a benchmark machine
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    bar_width = 0.8 / len(methods)
    figure, axes = plt.subplots(figsize=(max(8, 1.6 * len(results)), 5))
    for offset, method in enumerate(methods):
        timed = [(index, result.seconds(method.name)) for index, result in enumerate(results)]
        timed = [(index, seconds) for index, seconds in timed if seconds is not None]
        axes.bar([index + offset * bar_width for index, _ in timed], [seconds for _, seconds in timed], bar_width,
                 label=method.label)
    axes.set_yscale("log")
    axes.set_ylabel("seconds per call (median)")
    axes.set_xticks([index + 0.4 - bar_width / 2 for index in range(len(results))])
    axes.set_xticklabels([result.case.name for result in results])
    axes.legend(fontsize="small", ncol=2)
    axes.set_title(f"Per-sample Jacobian on {KIND_OF_DEVICE[device]} (lower is better)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
