"""Gradients of the Jacobian, for training with Jacobian penalties (Jacobian regularisation, PINNs,
contractive autoencoders): d<grad_J, J> / d(x, weights).

The forward pass runs our rules. The backward pass recomputes (y, J) with torch.func
(vmap over jacrev of the same function, per sample) and pulls the incoming cotangents back through that
computation, so the gradients are torch.func's by construction; the backward costs what torch.func's
Jacobian plus one backward through it costs. Two entry points:

- ``torch.ops.jacext.batch_jacobian`` itself, through ``torch.library.register_autograd``: the function
  is the op's layer encoding (a chain or a graph program), replayed in plain PyTorch by ``program.replay``;
- ``JacobianFunction`` for every other plan of the Python API (graph capture, fallback segments): the
  function is the model, called through ``torch.func.functional_call`` so that its parameters are
  inputs of the recomputation.

The per-layer rule ops (linear_jac_forward, ...) keep a backward that raises "not implemented": their
outputs are intermediate blocks whose derivative nobody needs outside a whole Jacobian.
"""
from typing import Callable, List, Tuple

import torch
from torch import nn
from torch.func import functional_call, jacrev, vjp, vmap

from .program import flat_output, replay

def per_sample_outputs_and_jacobians(fn: Callable, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(fn(x), J) with torch.func, differentiably: fn maps [B, *in] to [B, *out], samples independent."""
    if x.shape[0] == 0:
        output = fn(x)
        return output, x.new_zeros(0, *output.shape[1:], *x.shape[1:])

    def single(sample):
        output = fn(sample.unsqueeze(0)).squeeze(0)
        return output, output

    jacobian, output = vmap(jacrev(single, has_aux=True))(x)
    return output, jacobian


def _pull_back(fn_of_inputs: Callable, inputs: Tuple[torch.Tensor, ...], grad_output, grad_jacobian):
    """Cotangents of `inputs` for the cotangents of (y, J) = fn_of_inputs(*inputs)."""
    with torch.enable_grad():
        (output, jacobian), pullback = vjp(fn_of_inputs, *inputs)
    grad_output = torch.zeros_like(output) if grad_output is None else grad_output
    grad_jacobian = torch.zeros_like(jacobian) if grad_jacobian is None else grad_jacobian
    return pullback((grad_output, grad_jacobian))


# ---- the op: torch.ops.jacext.batch_jacobian(input, layers, params, mode) ----

def _setup_batch_jacobian(ctx, inputs, output):
    x, layers, params, _mode = inputs
    ctx.layers = list(layers)
    ctx.save_for_backward(x, *params)


def _backward_batch_jacobian(ctx, grad_output, grad_jacobian):
    x, *params = ctx.saved_tensors
    # Integer params (a gather's index) are constants of the replay: they have no gradient and vjp takes none.
    floating = [i for i, p in enumerate(params) if p.is_floating_point()]

    def outputs(sample_x, *weights):
        replayed = list(params)
        for i, weight in zip(floating, weights):
            replayed[i] = weight
        return per_sample_outputs_and_jacobians(lambda v: flat_output(v, replay(v, ctx.layers, replayed)), sample_x)

    grads = _pull_back(outputs, (x, *(params[i] for i in floating)), grad_output, grad_jacobian)
    param_grads = [None] * len(params)
    for i, grad in zip(floating, grads[1:]):
        param_grads[i] = grad
    return grads[0], None, param_grads, None


torch.library.register_autograd("jacext::batch_jacobian", _backward_batch_jacobian, setup_context=_setup_batch_jacobian)


class FusedJacobian(torch.autograd.Function):
    """The op's gradient for eager calls of the Python API, with the registered setup and backward: the
    registered autograd kernel flattens every argument (each layer string, each parameter) with pytree on
    every call, which cost a tiny model's call three times its no-grad time. Traced and compiled calls
    keep the registered kernel (ops.batch_jacobian picks)."""

    @staticmethod
    def forward(ctx, x, layers, mode, *params):  # ctx-style: a setup_context binds default args per call
        _setup_batch_jacobian(ctx, (x, layers, params, mode), None)
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.jacext.batch_jacobian.default(x, layers, list(params), mode)

    @staticmethod
    def backward(ctx, grad_output, grad_jacobian):
        grad_x, _, grad_params, _ = _backward_batch_jacobian(ctx, grad_output, grad_jacobian)
        return (grad_x, None, None, *grad_params)


# ---- the Python API's other plans ----

def needs_grad(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether a Jacobian of `model` at `x` must be differentiable: grad mode on and x or a parameter
    requiring grad."""
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for p in model.parameters())


class JacobianFunction(torch.autograd.Function):
    """(y, J) from `compute` (our rules, no graph) in forward; torch.func's gradients in backward.
    The trainable parameters travel as inputs, so autograd routes their gradients."""

    @staticmethod
    def forward(ctx, compute: Callable, model: nn.Module, names: List[str], x: torch.Tensor, *params):
        ctx.model, ctx.names = model, names
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            return compute(x)

    @staticmethod
    def backward(ctx, grad_output, grad_jacobian):
        x, *params = ctx.saved_tensors
        model, names = ctx.model, ctx.names

        def outputs(sample_x, *weights):
            replaced = dict(zip(names, weights))
            return per_sample_outputs_and_jacobians(lambda v: functional_call(model, replaced, (v,)), sample_x)

        grads = _pull_back(outputs, (x, *params), grad_output, grad_jacobian)
        return (None, None, None, *grads)


def differentiable_call(compute: Callable, model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """compute(x) = (y, J) with gradients for x and the trainable parameters of `model` (the model itself,
    or the graph.FunctionRoot that holds the modules a function closes over)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    names = [name for name, _ in named]
    return JacobianFunction.apply(compute, model, names, x, *(p for _, p in named))
