"""Several inputs and structured outputs: jx.batch_jacobian(model, (x1, x2), argnums=...) and models that
return a tuple, list or dict of tensors.

The engine differentiates one tensor [B, *in] to one tensor [B, *out]. A structured call is packed into
that form by `PackedModel`: every input's per-sample features side by side in one z [B, sum D_k], split
back into the model's arguments by slices inside the captured graph (index maps, native), and every
output leaf flattened and concatenated into [B, sum C_i] (a native concatenation). One Jacobian of the
packed model [B, sum C_i, sum D_k] holds every block d out_i / d in_k; they are cut out and returned in
torch.func.jacrev's nesting: the output structure outside, a tuple over argnums inside (a bare tensor
for one input or an int argnums).

Inputs that are not differentiated (not in argnums) travel in z too, and their columns are dropped: in
forward mode they cost tangent columns, in reverse mode nothing. They must be floating-point tensors.
"""
import math
from typing import Callable, Dict, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .graph import capture_root

_CACHE_ATTRIBUTE = "_jacobian_ext_packed"


class ModelLocalCache(dict):
    """A cache kept in a model's own __dict__ (here: its packed models; api.py: its plans). A copy or a
    pickle of the model starts with an empty one: the cached objects hold the original model."""

    def __copy__(self):
        return type(self)()

    def __deepcopy__(self, memo):
        return type(self)()

    def __reduce__(self):
        return (type(self), ())


class PackedModel(nn.Module):
    """model(*inputs) -> structured output, as z [B, sum D_k] -> [B, sum C_i] (see the module docstring)."""

    def __init__(self, model: Callable, input_shapes: Sequence[Tuple[int, ...]], output_sizes: Sequence[int]):
        super().__init__()
        # A submodule, so that the capture traces into it (a function: with the modules it closes over).
        self.model = model if isinstance(model, nn.Module) else capture_root(model)
        self.input_shapes = [tuple(shape) for shape in input_shapes]
        self.input_sizes = [math.prod(shape) for shape in self.input_shapes]
        self.output_sizes = list(output_sizes)

    def forward(self, z):
        batch = z.shape[0]
        inputs, start = [], 0
        for shape, size in zip(self.input_shapes, self.input_sizes):
            inputs.append(z[:, start:start + size].reshape(batch, *shape))
            start += size
        leaves = pytree.tree_leaves(self.model(*inputs))
        return torch.cat([leaf.reshape(batch, size) for leaf, size in zip(leaves, self.output_sizes)], dim=1)


def _check_inputs(inputs: Sequence) -> None:
    if not inputs:
        raise ValueError("x must hold at least one input tensor")
    for k, value in enumerate(inputs):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"x[{k}] must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise NotImplementedError(
                f"x[{k}] has dtype {value.dtype}: every input travels in one floating-point tensor, so integer "
                "inputs (token ids) are not supported yet, differentiated or not")
        if value.dim() < 1:
            raise ValueError(f"x[{k}] must have a batch dimension, got a 0-d tensor")
        if value.shape[0] != inputs[0].shape[0]:
            raise ValueError(f"every input must have the same batch size: x[0] has {inputs[0].shape[0]}, "
                             f"x[{k}] has {value.shape[0]}")
        if value.dtype != inputs[0].dtype or value.device != inputs[0].device:
            raise TypeError(f"every input must share x[0]'s dtype and device ({inputs[0].dtype} on "
                            f"{inputs[0].device}), x[{k}] is {value.dtype} on {value.device}")


def _argnums(argnums, count: int) -> Tuple[int, ...]:
    numbers = (argnums,) if isinstance(argnums, int) else tuple(argnums) if isinstance(argnums, (tuple, list)) else ()
    if not numbers or not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
        raise TypeError(f"argnums must be an int or a non-empty tuple of ints, got {argnums!r}")
    normalized = tuple(n + count if n < 0 else n for n in numbers)
    if any(not 0 <= n < count for n in normalized) or len(set(normalized)) != len(normalized):
        raise ValueError(f"argnums {argnums!r} must name distinct inputs among the model's {count}")
    return normalized


def _packed_model(model: Callable, inputs: Sequence[torch.Tensor]):
    """(PackedModel, output tree spec, output leaf shapes) for inputs shaped like `inputs`; cached with the
    model per per-sample input shapes, dtype and device."""
    key = (tuple(tuple(t.shape[1:]) for t in inputs), inputs[0].dtype, inputs[0].device)
    holder = getattr(model, "__dict__", None)
    cache: Dict = holder.setdefault(_CACHE_ATTRIBUTE, ModelLocalCache()) if isinstance(holder, dict) else {}
    if key not in cache:
        probes = [t[:1] if t.shape[0] else t.new_zeros((1, *t.shape[1:])) for t in inputs]
        with torch.no_grad():
            output = model(*probes)
        leaves, spec = pytree.tree_flatten(output)
        if not leaves or not all(isinstance(leaf, torch.Tensor) and leaf.dim() >= 1 and leaf.shape[0] == 1
                                 for leaf in leaves):
            raise TypeError("the model must return a tensor [B, *out] or a tuple, list or dict of them, each keeping "
                            f"the batch dimension; one sample in gave {type(output).__name__}")
        shapes = [tuple(leaf.shape[1:]) for leaf in leaves]
        packed = PackedModel(model, [t.shape[1:] for t in inputs], [math.prod(s) for s in shapes])
        cache[key] = (packed, spec, shapes)
    return cache[key]


def structured_jacobian(model: Callable, x: Union[torch.Tensor, Sequence[torch.Tensor]], argnums, jacobian_of):
    """(output structure, Jacobian structure) of model(*x); jacobian_of(packed, z) -> (y, J) is the engine."""
    several = isinstance(x, (tuple, list))
    inputs = list(x) if several else [x]
    _check_inputs(inputs)
    numbers = _argnums(0 if argnums is None and not several else
                       tuple(range(len(inputs))) if argnums is None else argnums, len(inputs))
    packed, spec, out_shapes = _packed_model(model, inputs)
    batch = inputs[0].shape[0]
    z = torch.cat([t.reshape(batch, packed_size) for t, packed_size in zip(inputs, packed.input_sizes)], dim=1)
    y, jacobian = jacobian_of(packed, z)
    in_starts = [sum(packed.input_sizes[:k]) for k in range(len(inputs))]
    outputs, blocks, start = [], [], 0
    for shape, size in zip(out_shapes, packed.output_sizes):
        outputs.append(y[:, start:start + size].reshape(batch, *shape))
        per_input = tuple(
            jacobian[:, start:start + size, in_starts[k]:in_starts[k] + packed.input_sizes[k]]
            .reshape(batch, *shape, *inputs[k].shape[1:]) for k in numbers)
        blocks.append(per_input[0] if isinstance(argnums, int) or (argnums is None and not several) else per_input)
        start += size
    return pytree.tree_unflatten(outputs, spec), pytree.tree_unflatten(blocks, spec)
