"""Memory budgets: parse max_memory, estimate the bytes a plan needs per sample, and run a batch in
chunks that fit the budget, filling one preallocated result.

The estimate is conservative and counts, per sample and in the plan's dtype:
  result: y and J (out + out * in numbers), kept for the whole batch;
  work:   the Jacobian blocks the chosen sweep holds at once (two of the widest block: a rule's input
          and output; every tangent on the graph path in forward mode, which keeps them all; the peak
          of the live cotangents in reverse mode), every layer's activation, and one more J (a chunk's
          J before it is copied into the result, or the forward sweep's final transpose).
What it does not see: the temporaries inside a torch.func fallback module (only its input and output
widths are known) and allocator slack; the default budget's fraction leaves room for those.
"""
import math
import os
import re
import time
from typing import Optional, Tuple, Union

import torch

from .cost import Bracketing
from .graph import GraphPlan
from .walker import run_plan

# Share of the available memory the default budget takes: the rest is left to the allocator's slack,
# fallback temporaries and the rest of the process.
DEFAULT_FRACTION = 0.5
# Available memory is read at most this often (seconds): the fast path must not pay a system call
# on every call.
_AVAILABLE_REFRESH_S = 1.0
_available_cache = {}  # device -> (time read, bytes)
# A need this small fits the default budget on any machine that runs torch (a latency-bound call must not
# pay for reading the available memory).
_ALWAYS_FITS_BYTES = 1 << 26

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_max_memory(value: Union[None, int, float, str]) -> Optional[int]:
    """Bytes from an int, or a string such as "2GB", "512MiB", "1.5 GB" (KB/MB/GB/TB are powers of
    1000, KiB/MiB/GiB/TiB powers of 1024); None stays None (the default budget)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"max_memory must be a number of bytes or a string such as '2GB', got {type(value).__name__}")
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"max_memory must be a size such as 1000000, '2GB', '512MiB' or '1.5 GB', got {value!r}")
        number = float(match.group(1)) * _UNITS[match.group(2).lower()]
    else:
        number = value
    if not math.isfinite(number) or number < 1:
        raise ValueError(f"max_memory must be at least one byte, got {value!r}")
    return int(number)


def available_memory(device: torch.device) -> int:
    """Free bytes: MemAvailable (CPU, split between the processes of a torchrun node) or the CUDA
    device's free memory plus what torch's caching allocator holds unused; re-read at most once a second."""
    now = time.monotonic()
    cached = _available_cache.get(device)
    if cached is not None and now - cached[0] < _AVAILABLE_REFRESH_S:
        return cached[1]
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        free = _host_available() // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    _available_cache[device] = (now, free)
    return free


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # free pages: a lower bound


def budget(max_memory: Optional[int], device: torch.device) -> int:
    return max_memory if max_memory is not None else int(DEFAULT_FRACTION * available_memory(device))


def bytes_per_sample(plan, mode: str) -> Tuple[int, int]:
    """(result bytes, work bytes) per sample for a resolved mode; computed once per plan and mode."""
    cache = plan.__dict__.get("_bytes_per_sample")  # the plan lives as long as its estimate
    if cache is None:
        cache = plan.__dict__["_bytes_per_sample"] = {}
    if mode not in cache:
        itemsize = torch.empty((), dtype=plan.dtype).element_size()
        out, inp = plan.out_features, plan.in_features
        work = _graph_work(plan, mode) if isinstance(plan, GraphPlan) else _segment_work(plan, mode)
        cache[mode] = (itemsize * (out + out * inp), itemsize * (work + out * inp))
    return cache[mode]


def _segment_work(plan, mode) -> int:
    """Fused segments: one block of rows x width at a time (held as the input and output of a rule).
    The seed is a lazy identity, never a [D, D] or [C, C] block: forward blocks have the widths of the
    layers' outputs, reverse blocks those of their inputs. A split bracketing holds every part's J and
    every join's product, and runs one part at a time."""
    if isinstance(mode, Bracketing):
        parts = [(plan.part(sweep.start, sweep.stop), sweep.mode) for sweep in mode.sweeps()]
        held = sum(part.out_features * part.in_features for part, _ in parts)
        return held + _joined_sizes(plan, mode) + max(_segment_work(part, sweep_mode) for part, sweep_mode in parts)
    activations = [plan.in_features] + [math.prod(step.output_shape) for step in plan.steps]
    if mode == "forward":
        rows, widths = plan.in_features, activations[1:]
    else:
        rows, widths = plan.out_features, [math.prod(step.input_shape) for step in plan.steps]
    return 2 * rows * max(widths, default=0) + sum(activations)


def _joined_sizes(plan, node) -> int:
    """Entries of every product that the joins of a bracketing create."""
    if node.is_sweep:
        return 0
    rows = math.prod(plan.steps[node.stop - 1].output_shape)
    columns = math.prod(plan.steps[node.start].input_shape)
    return rows * columns + _joined_sizes(plan, node.earlier) + _joined_sizes(plan, node.later)


def _graph_work(plan: GraphPlan, mode: str) -> int:
    """Graph path: the seed counts as a full block, since index-map rules (reshape, scale, slicing)
    materialise the identity they receive."""
    widths = {g.node: math.prod(g.shape) for g in plan.nodes if g.rule is not None or g.node in plan.absorbed}
    widths[plan.input_node] = plan.in_features
    activations = sum(widths.values())
    largest = max(widths.values())
    if mode == "forward":  # the walker keeps every node's tangent to the end
        return plan.in_features * (activations + largest) + activations
    live = {plan.output_node: widths.get(plan.output_node, plan.out_features)}
    peak = 0
    for g in reversed(plan.nodes):
        if g.rule is None or g.node not in live:
            continue
        own = live.pop(g.node)
        pulled = {source: widths[source] for source in g.inputs if source not in live}
        peak = max(peak, sum(live.values()) + own + sum(pulled.values()))
        live.update(pulled)
    return plan.out_features * (peak + largest) + activations


def samples_per_chunk(plan, mode: str, batch: int, budget_bytes: int, keep_result: bool = True) -> int:
    """The largest chunk whose work fits the budget beside the whole batch's y and J (keep_result) or
    beside the chunk's own (a caller that stores each chunk away); raises MemoryError naming the bytes
    needed when not even one sample fits."""
    result, work = bytes_per_sample(plan, mode)
    kept = batch * result if keep_result else 0
    work = work if keep_result else work + result
    if kept + work > budget_bytes:
        what = (f"y and J for {batch} samples ({_size(kept)}) and the working memory of one sample ({_size(work)})"
                if keep_result else f"y, J and the working memory of one sample ({_size(work)})")
        raise MemoryError(
            f"jacobian_ext needs at least {_size(kept + work)} ({what}) but the budget max_memory is "
            f"{_size(budget_bytes)}; raise max_memory, or stream the results with jacobian_ext.jacobians_to_disk"
            + (" and targets= or reduce=" if not keep_result else "")
        )
    return max(1, min(batch, (budget_bytes - kept) // work))


def fits_in_one_run(plan, x: torch.Tensor, mode: str, max_memory: Optional[int]) -> bool:
    """Whether the whole batch's estimated need fits the budget (else run_within_budget runs it in chunks).
    Under the default budget a need below _ALWAYS_FITS_BYTES fits without reading the available memory."""
    result, work = bytes_per_sample(plan, mode)
    need = x.shape[0] * (result + work)
    if max_memory is None and need <= _ALWAYS_FITS_BYTES:
        return True
    return need <= budget(max_memory, x.device)


def run_within_budget(plan, x: torch.Tensor, mode: str, max_memory: Optional[int]):
    """(y, J) of run_plan on the whole batch when it fits the budget, else in chunks that
    fill one preallocated y and J. Every chunk runs the mode resolved for the whole batch, so results
    equal the whole call's up to rounding: BLAS may round the forward pass differently by batch size."""
    batch = x.shape[0]
    if fits_in_one_run(plan, x, mode, max_memory):
        return run_plan(plan, x, mode)
    chunk = samples_per_chunk(plan, mode, batch, budget(max_memory, x.device))
    output = x.new_empty(batch, *plan.output_shape, dtype=plan.dtype)  # x may be integer-valued (wrt=)
    jacobian = x.new_empty(batch, *plan.output_shape, *plan.input_shape, dtype=plan.dtype)
    for start in range(0, batch, chunk):
        part_output, part_jacobian = run_plan(plan, x[start:start + chunk], mode)
        output[start:start + chunk] = part_output
        jacobian[start:start + chunk] = part_jacobian
    return output, jacobian


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit} ({nbytes} bytes)"
    return f"{nbytes} bytes"
