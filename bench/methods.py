"""Every way of computing J [B, C, D] that the suite times: ours in each mode and the peers.

prepare(model, x) does the one-off work (building the module, JAX's weight copy and compile) and returns a
zero-argument callable that computes J; the timer calls only that callable.
"""
from dataclasses import dataclass
from typing import Callable, Tuple

import torch
from torch import nn

import jacobian_ext as jx

from . import jax_peers
from .cases import DEVICES


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # short column header
    is_ours: bool
    prepare: Callable[[nn.Module, torch.Tensor], Callable[[], object]]
    available: Callable[[], bool] = lambda: True
    devices: Tuple[str, ...] = DEVICES  # where it runs


def _ours(mode: str, cuda_graphs: bool = False):
    def prepare(model, x):
        jm = jx.compile(model, mode=mode, cuda_graphs=cuda_graphs)

        def run():
            with torch.no_grad():
                return jm(x)[1]

        return run

    return prepare


def _per_sample(model):
    """model as a function of one sample [D] -> [C], the form torch.func transforms expect."""
    return lambda sample: model(sample.unsqueeze(0)).squeeze(0)


def _loop_over_outputs(model, x):
    """The classic answer: one backward per output column. Samples are independent, so the gradient
    of the batch sum of column i holds every sample's row i."""
    x = x.detach().requires_grad_(True)

    def run():
        y = model(x)
        rows = [torch.autograd.grad(y[:, i].sum(), x, retain_graph=i + 1 < y.shape[1])[0] for i in range(y.shape[1])]
        return torch.stack(rows, 1)

    return run


def _functional_jacobian(model, x):
    """autograd.functional.jacobian of x -> model(x).sum(0) is [C, B, D]: the sum over the batch keeps
    one block per sample because samples do not interact."""
    summed = lambda inputs: model(inputs).sum(0)  # noqa: E731
    return lambda: torch.autograd.functional.jacobian(summed, x, vectorize=True).permute(1, 0, 2)


def _vmap_of(transform):
    def prepare(model, x):
        batched = torch.func.vmap(transform(_per_sample(model)))
        return lambda: batched(x)

    return prepare


METHODS = [
    Method("ours (auto)", "ours auto", True, _ours("auto")),
    Method("ours (forward)", "ours fwd", True, _ours("forward")),
    Method("ours (reverse)", "ours rev", True, _ours("reverse")),
    Method("ours (auto, CUDA graphs)", "ours graphs", True, _ours("auto", cuda_graphs=True), devices=("cuda",)),
    Method("loop of autograd.grad", "grad loop", False, _loop_over_outputs),
    Method("autograd.functional.jacobian", "AF.jacobian", False, _functional_jacobian),
    Method("torch.func vmap(jacrev)", "vmap jacrev", False, _vmap_of(torch.func.jacrev)),
    Method("torch.func vmap(jacfwd)", "vmap jacfwd", False, _vmap_of(torch.func.jacfwd)),
    # CPU only: the weights go through numpy to JAX's CPU build; in a GPU run they would time the CPU.
    Method("JAX jit(vmap(jacrev))", "JAX jacrev", False, jax_peers.prepare("jacrev"), jax_peers.available, ("cpu",)),
    Method("JAX jit(vmap(jacfwd))", "JAX jacfwd", False, jax_peers.prepare("jacfwd"), jax_peers.available, ("cpu",)),
]
METHODS_BY_NAME = {method.name: method for method in METHODS}
REFERENCE = "torch.func vmap(jacrev)"  # every method's J is checked against this one
AUTO = "ours (auto)"


def available_methods(device: str):
    return [method for method in METHODS if device in method.devices and method.available()]


def as_torch(jacobian) -> torch.Tensor:
    """A method's result as a torch tensor (JAX returns its own arrays)."""
    return jacobian if isinstance(jacobian, torch.Tensor) else jax_peers.to_torch(jacobian)
