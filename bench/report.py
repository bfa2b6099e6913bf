"""Renders the results as markdown: the machine, its measured rates, then one table per question."""
import datetime
import os
import platform
from typing import List, Optional

import torch

from . import jax_peers
from .floors import COPY_BYTES, MachineRates
from .methods import AUTO, Method
from .suite import CaseResult


KIND_OF_DEVICE = {"cpu": "CPU", "cuda": "GPU"}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else cpu_model()


def machine_lines(rates: MachineRates, device: str) -> List[str]:
    host = f"{cpu_model()}, {os.cpu_count()} cores, torch.get_num_threads() = {torch.get_num_threads()}"
    if device == "cuda":
        gpu = torch.cuda.get_device_properties(torch.cuda.current_device())
        machine = (f"- Device: {device_name(device)} ({gpu.multi_processor_count} SMs, "
                   f"{gpu.total_memory / 2**30:.0f} GiB, compute capability {gpu.major}.{gpu.minor}); host {host}")
        versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}"  # no JAX: its peers are CPU only
        where, precision = " on the GPU", ", TF32 off"
    else:
        machine = f"- Machine: {host}"
        versions = f"torch {torch.__version__}, JAX {jax_peers.version()}"
        where, precision = "", ""
    size = rates.gemm_size
    return [
        f"- Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        machine,
        f"- Versions: {versions}, Python {platform.python_version()}",
        f"- Measured GEMM rate: {rates.gemm_flops / 1e9:.1f} GFLOP/s "
        f"(float32 torch.mm, {size} x {size} x {size}{precision}, median)",
        f"- Measured memory bandwidth: {rates.bandwidth / 1e9:.1f} GB/s "
        f"(copy of a {COPY_BYTES // 2**20} MiB tensor{where}, reads + writes, median)",
    ]


def format_seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def format_ratio(ratio: float) -> str:
    return f"{ratio:.0f}x" if ratio >= 100 else f"{ratio:.2g}x" if ratio < 1 else f"{ratio:.3g}x"


def fastest_peer(result: CaseResult, methods: List[Method]):
    """(name, seconds) of the fastest correct peer, or None when none was timed."""
    peers = [(result.seconds(m.name), m.name) for m in methods if not m.is_ours and m.name in result.timings]
    return (min(peers)[1], min(peers)[0]) if peers else None


def _cell(result: CaseResult, method: Method, min_runs: int) -> str:
    if method.name in result.failures:
        return result.failures[method.name]
    timing = result.timings.get(method.name)
    if timing is None:
        return "—"
    text = format_seconds(result.seconds(method.name))
    if timing.cold:
        return f"{text} (first call)"
    runs = len(timing.samples)
    return f"{text} ({runs} run{'s' if runs > 1 else ''})" if runs < min_runs else text


def _row(cells) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _shape_cells(result: CaseResult):
    case = result.case
    return [case.name, case.batch, case.in_features, case.hidden_text, case.out_features]


def times_table(results: List[CaseResult], methods: List[Method], min_runs: int) -> List[str]:
    header = ["case", "B", "D", "hidden", "C"] + [m.label for m in methods] + ["fastest peer / ours"]
    lines = [_row(header), _row(["---"] * len(header))]
    labels = {method.name: method.label for method in methods}
    for result in results:
        best, ours = fastest_peer(result, methods), result.seconds(AUTO)
        speedup = f"{format_ratio(best[1] / ours)} ({labels[best[0]]})" if best and ours else "—"
        lines.append(_row(_shape_cells(result) + [_cell(result, m, min_runs) for m in methods] + [speedup]))
    return lines


def floor_table(results: List[CaseResult], rates: MachineRates) -> List[str]:
    header = ["case", "auto chose", "ours (auto)", "FLOP floor, all units", "FLOP floor, active units",
              "ReLU active", "output-bytes floor", "ours / floor (all)", "ours / floor (active)"]
    lines = [_row(header), _row(["---"] * len(header))]
    for result in results:
        floor, ours = result.floor, result.seconds(AUTO)
        active_share = f"{floor.active_fraction:.0%}" if floor.active_fraction is not None else "—"
        ratios = [format_ratio(ours / floor.seconds(rates, active)) if ours else "—" for active in (False, True)]
        lines.append(_row([
            result.case.name, result.auto_mode, format_seconds(ours),
            format_seconds(floor.flop_seconds(rates, False)), format_seconds(floor.flop_seconds(rates, True)),
            active_share, format_seconds(floor.bytes_seconds(rates)), *ratios,
        ]))
    return lines


def memory_table(results: List[CaseResult], methods: List[Method]) -> List[str]:
    header = ["case"] + [m.label for m in methods] + ["J + largest block", "ours auto / that", "ours auto / vmap jacrev"]
    lines = [_row(header), _row(["---"] * len(header))]
    for result in results:
        cells = []
        for method in methods:
            if method.name not in result.peak_memory:  # not timed either: its check failed
                cells.append("—")
            else:
                growth = result.peak_memory[method.name]
                cells.append("failed" if growth is None else f"{growth / 2**20:.1f}")
        ours, peer = result.peak_memory.get("ours (auto)"), result.peak_memory.get("torch.func vmap(jacrev)")
        cells.append(f"{result.memory_bound / 2**20:.1f}")
        # Below a MiB the bound is under the resolution of peak RSS (pages, the allocator's arenas).
        measurable = result.memory_bound >= 2**20
        cells.append(f"{ours / result.memory_bound:.2f}x" if ours is not None and measurable else "below RSS resolution")
        cells.append(f"{ours / peer:.2f}x" if ours is not None and peer else "—")
        lines.append(_row([result.case.name] + cells))
    return lines


TIME_MEASURED = {
    "cpu": "Median wall time of one call computing all of J [B, C, D] (ours under torch.no_grad()).",
    "cuda": "Median time of one call computing all of J [B, C, D] on the GPU (ours under torch.no_grad()), "
            "between CUDA events recorded just before and after it with the GPU idle at the start, so that "
            "the host's launch overhead counts.",
}
MEMORY_MEASURED = {
    "cpu": "MiB of peak-RSS growth in a fresh process from running the method once, over the baseline after "
           "building model and input (`failed`: the process errored or timed out). `J + largest block`: bytes "
           "of J plus the largest intermediate Jacobian block of auto's order ([B, C, H] reverse, [B, D, H] "
           "forward), the issue's target being at most 1.25x that.",
    "cuda": "MiB by which torch.cuda.max_memory_allocated rose above the memory allocated before one warm call "
            "of the method (model, input and what the method keeps between calls); memory the caching "
            "allocator holds in reserve does not count (`failed`: the call errored).",
}


def render(results: List[CaseResult], methods: List[Method], rates: MachineRates, command: str, min_runs: int,
           device: str, not_run: List[str]) -> str:
    lines = [f"# jacobian_ext {KIND_OF_DEVICE[device]} benchmark", "", f"`{command}`", ""]
    lines += machine_lines(rates, device)
    if not_run:
        lines.append(f"- Not run, to stay within `--max-seconds`: {', '.join(not_run)}")
    lines += [
        "", "## Time per call",
        "",
        f"{TIME_MEASURED[device]} Methods run "
        "interleaved in one process after warm-up. Before timing, every J is checked against "
        "torch.func vmap(jacrev) (max error / max |J| ≤ 1e-4); a method that fails shows why instead of a time. "
        f"A time marked `(n runs)` comes from fewer than {min_runs} runs of a slow call, `(first call)` from the "
        "check call alone, which includes one-off work such as tracing or JIT compilation. "
        "Last column: the fastest peer's time over ours (auto); above 1 we are faster.",
        "",
    ] + times_table(results, methods, min_runs)
    lines += [
        "", "## Against the floor",
        "",
        "FLOP floor: 2 x the multiply-adds of the cheapest of forward accumulation, reverse accumulation and the "
        "best split into a forward and a reverse part joined per sample, with lazy identity "
        "seeds (a Linear applied to the identity is free), over the measured GEMM rate; once over all units, once "
        "counting only the ReLU units active on this input. Output-bytes floor: bytes of J over the measured "
        "bandwidth. ours / floor uses the larger of the FLOP and bytes floors.",
        "",
    ] + floor_table(results, rates)
    if any(result.peak_memory for result in results):
        lines += ["", "## Peak memory", "", MEMORY_MEASURED[device], ""] + memory_table(results, methods)
    return "\n".join(lines) + "\n"
