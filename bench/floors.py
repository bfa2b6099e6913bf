"""Lower bounds on the time of computing J on this machine: the FLOPs of the cheapest accumulation
order (either sweep, or the best split into a forward and a reverse part) over the measured GEMM rate, and the bytes of J over the measured memory bandwidth."""
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from .timing import seconds_of

# Square float32 GEMMs large enough to reach the steady rate: of the BLAS on a CPU, of cuBLAS on a GPU
# (at 1024 a large GPU is still partly idle).
GEMM_SIZES = {"cpu": 1024, "cuda": 4096}
COPY_BYTES = 256 * 2**20  # far beyond the last-level cache, and beyond a GPU's L2


@dataclass(frozen=True)
class MachineRates:
    gemm_flops: float  # FLOP/s of float32 torch.mm
    bandwidth: float  # bytes/s, reads plus writes of a large copy
    gemm_size: int  # the GEMM measured was gemm_size x gemm_size x gemm_size


def measure_rates(device: str, runs: int = 15) -> MachineRates:
    """On `device`, whose float32 matmuls the caller has set to the precision the methods run at."""
    size = GEMM_SIZES[device]
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    torch.mm(a, b, out=out)
    gemm_seconds = statistics.median(seconds_of(lambda: torch.mm(a, b, out=out), device) for _ in range(runs))
    source = torch.ones(COPY_BYTES // 4, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    copy_seconds = statistics.median(seconds_of(lambda: target.copy_(source), device) for _ in range(runs))
    return MachineRates(2 * size**3 / gemm_seconds, 2 * COPY_BYTES / copy_seconds, size)


@dataclass(frozen=True)
class _Factor:
    """One layer of the chain: kind is "linear", "mask" (ReLU), "diag" (other activation) or "softmax".
    in_units/out_units are per-sample [B] counts of the units that take part: for a Linear next to a
    ReLU, with active_only, only the active ones. in_width/out_width count every unit."""

    kind: str
    in_units: torch.Tensor
    out_units: torch.Tensor
    in_width: int
    out_width: int


def _chain(model: nn.Sequential, x: torch.Tensor, active_only: bool) -> List[_Factor]:
    layers = list(model)
    widths = [x.shape[1]]  # widths[i] is the input width of layer i
    # units[i] is the same, per sample
    units = [torch.full((x.shape[0],), float(x.shape[1]), dtype=torch.float64, device=x.device)]
    hidden = x
    with torch.no_grad():
        for layer in layers:
            out = layer(hidden)
            widths.append(out.shape[1])
            if isinstance(layer, nn.ReLU) and active_only:
                units.append((hidden > 0).sum(1).double())
            else:
                units.append(torch.full_like(units[0], float(out.shape[1])))
            hidden = out
    factors = []
    for index, layer in enumerate(layers):
        kind = {nn.Linear: "linear", nn.ReLU: "mask", nn.Softmax: "softmax"}.get(type(layer), "diag")
        out_units = units[index + 1]
        if kind == "linear" and index + 1 < len(layers) and isinstance(layers[index + 1], nn.ReLU):
            out_units = units[index + 2]  # the ReLU discards inactive rows, so only active ones are computed
        factors.append(_Factor(kind, units[index], out_units, widths[index], widths[index + 1]))
    return factors


def _sweep_macs(factors: List[_Factor], rows: int, active_only: bool) -> float:
    """Multiply-adds of pushing a [rows, width] block per sample through `factors`, starting from a lazy
    identity: a Linear on the identity is free (the block is its weight, shared by all samples), a
    Linear on a shared block is one GEMM for all samples, and the first per-sample factor makes every
    later Linear a GEMM per sample."""
    state = "identity"
    macs = 0.0
    for factor in factors:
        if factor.kind == "linear":
            if state == "shared":
                macs += rows * factor.in_width * factor.out_width
            elif state == "per_sample":
                macs += rows * float((factor.in_units * factor.out_units).sum())
            state = "shared" if state == "identity" else state
            continue
        if factor.kind == "softmax":  # s * (J - s^T J): one dot product and one multiply per entry
            macs += 2 * rows * float(factor.out_units.sum())
        elif factor.kind == "diag" or not active_only:  # with active_only a ReLU mask selects rows for free
            macs += rows * float(factor.out_units.sum())
        state = "per_sample"
    return macs


def _split_macs(factors: List[_Factor], split: int, in_features: int, out_features: int, active_only: bool) -> float:
    """A forward sweep over factors[:split], a reverse sweep over factors[split:], and the per-sample join
    [C, H] x [H, D] over the H units between them (only the active ones after a ReLU, with active_only)."""
    join = out_features * in_features * float(factors[split].in_units.sum())
    return (_sweep_macs(factors[:split], in_features, active_only)
            + _sweep_macs(list(reversed(factors[split:])), out_features, active_only) + join)


@dataclass(frozen=True)
class CaseFloor:
    macs: Dict[str, float]  # "forward"/"reverse"/"split" (the best single split) over all units
    active_macs: Dict[str, float]  # the same, counting only active ReLU units of this input
    output_bytes: int
    active_fraction: Optional[float]  # of all ReLU units over the batch; None without ReLU

    def flop_seconds(self, rates: MachineRates, active_only: bool) -> float:
        macs = self.active_macs if active_only else self.macs
        return 2 * min(macs.values()) / rates.gemm_flops

    def bytes_seconds(self, rates: MachineRates) -> float:
        return self.output_bytes / rates.bandwidth

    def seconds(self, rates: MachineRates, active_only: bool) -> float:
        """The tighter of the two bounds."""
        return max(self.flop_seconds(rates, active_only), self.bytes_seconds(rates))


def case_floor(model: nn.Sequential, x: torch.Tensor) -> CaseFloor:
    in_features = x.shape[1]
    with torch.no_grad():
        out_features = model(x[:1]).shape[1]
    counts = {}
    for active_only in (False, True):
        factors = _chain(model, x, active_only)
        counts[active_only] = {
            "forward": _sweep_macs(factors, in_features, active_only),
            "reverse": _sweep_macs(list(reversed(factors)), out_features, active_only),
            "split": min((_split_macs(factors, split, in_features, out_features, active_only)
                          for split in range(1, len(factors))), default=float("inf")),
        }
    output_bytes = x.shape[0] * out_features * in_features * x.element_size()
    return CaseFloor(counts[False], counts[True], output_bytes, _active_fraction(model, x))


def _active_fraction(model: nn.Sequential, x: torch.Tensor) -> Optional[float]:
    active = total = 0
    hidden = x
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.ReLU):
                active += int((hidden > 0).sum())
                total += hidden.numel()
            hidden = layer(hidden)
    return active / total if total else None
