"""Captum's argument forms for the engine: inputs as a tensor or a tuple of tensors, per-input baselines,
additional_forward_args and N-d or per-sample-scalar outputs, turned into one input tensor of one model
[B, D] -> [B, C] (what JacobianRows and the methods in gradients.py work on), and the results turned back.

A call whose inputs are one tensor [B, *in], with no per-sample additional arguments and a model returning
[B, C], runs on the model itself, so it keeps every fast path (a fused chain, the affine prefix of
integrated gradients). Any other call is packed with structured.PackedModel: the attributed inputs, then
the per-sample additional arguments, side by side in one z [B, sum D_k], and the output flattened to
[B, prod(out)]. Per-sample additional arguments are the tensors with a batch dimension (dim 0 of size B):
the ones Captum expands with the inputs over integration steps and noise samples. In z they ride along
undifferentiated: their baseline is their own value, so every integration point and noisy copy carries
them unchanged, and their columns are dropped from the results; one of another dtype (token ids, a bool
mask) rides in the inputs' dtype and is converted back for the model, where that is exact. Every other
argument (numbers, lists, None, tensors without the batch dimension) is passed unchanged to every call, as
Captum passes it."""
import math
from collections import OrderedDict
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..api import _layout, _same_layout
from ..graph import capture_root
from ..structured import PackedModel
from .gradients import baseline_tensor
from .rows import JacobianRows

# Engines (one JacobianRows each, with its plans) kept per attribution object: one per input signature.
MAX_CACHED_ENGINES = 8


class InvalidArgument(ValueError, AssertionError):
    """An argument that does not fit the call; also an AssertionError, which is what Captum raises there."""


class InvalidArgumentType(TypeError, AssertionError):
    """An argument of the wrong type; also an AssertionError, which is what Captum raises there."""


def as_tuple(inputs, name: str = "inputs") -> Tuple[Tuple[torch.Tensor, ...], bool]:
    """(the input tensors, whether they came as a tuple), checked as the engine needs them."""
    given_as_tuple = isinstance(inputs, tuple)
    tensors = inputs if given_as_tuple else (inputs,)
    if not tensors:
        raise ValueError(f"{name} must be a tensor or a non-empty tuple of tensors")
    for k, tensor in enumerate(tensors):
        label = f"{name}[{k}]" if given_as_tuple else name
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{label} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"{label} must be a floating-point tensor, got dtype {tensor.dtype}")
        if tensor.dim() < 1:
            raise ValueError(f"{label} must have a batch dimension, got a 0-d tensor")
        first = tensors[0]
        if tensor.shape[0] != first.shape[0]:
            raise ValueError(f"every input must have the same batch size: {name}[0] has {first.shape[0]}, "
                             f"{label} has {tensor.shape[0]}")
        if tensor.dtype != first.dtype or tensor.device != first.device:
            raise TypeError(f"every input must share {name}[0]'s dtype and device ({first.dtype} on {first.device}), "
                            f"{label} is {tensor.dtype} on {tensor.device}")
    return tuple(tensors), given_as_tuple


def as_captum_result(results: Sequence[torch.Tensor], given_as_tuple: bool):
    """Captum's return form: a tuple for tuple inputs (one element for (x,)), else the tensor."""
    return tuple(results) if given_as_tuple else results[0]


class _WithArguments(nn.Module):
    """forward_func(*inputs, *additional_forward_args) as a function of the inputs and the per-sample
    arguments alone; the other arguments are fixed at construction (graph capture bakes them in)."""

    def __init__(self, forward_func: Callable, num_inputs: int, arguments: Optional[tuple], per_sample: List[int]):
        super().__init__()
        self.forward_func = capture_root(forward_func)
        self.num_inputs = num_inputs
        self.arguments = arguments
        self.per_sample = per_sample

    def forward(self, *tensors):
        if self.arguments is None:
            return self.forward_func(*tensors)
        arguments = list(self.arguments)
        for position, value in zip(self.per_sample, tensors[self.num_inputs:]):
            dtype = self.arguments[position].dtype
            # An argument of another dtype travels in the inputs' (exactly: checked by EngineCache.call).
            arguments[position] = value if value.dtype == dtype else value.to(dtype)
        return self.forward_func(*tensors[:self.num_inputs], *arguments)


class CaptumCall:
    """One attribute() call's inputs and additional_forward_args on one engine: `x` is the engine's input
    [B, *in] (the input itself, or z), `rows` its JacobianRows, `output_shape` the model's per-sample output
    shape. Build it with EngineCache.call."""

    def __init__(self, inputs: Tuple[torch.Tensor, ...], given_as_tuple: bool, arguments: Optional[tuple],
                 per_sample: List[int], rows: JacobianRows, output_shape: Tuple[int, ...], packed: bool):
        self.inputs, self.given_as_tuple = inputs, given_as_tuple
        self.arguments, self.per_sample = arguments, per_sample
        self.rows, self.output_shape, self.packed = rows, output_shape, packed
        self.batch = inputs[0].shape[0]
        self.input_sizes = [math.prod(t.shape[1:]) for t in inputs]
        self.x = self.pack(inputs)

    def _argument_tensors(self) -> List[torch.Tensor]:
        """The per-sample arguments in the inputs' dtype, as they travel in z."""
        dtype = self.inputs[0].dtype
        return [self.arguments[k].to(dtype) for k in self.per_sample]

    def pack(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The engine's input for input tensors shaped like the inputs (noisy copies: a multiple of the
        batch, the per-sample arguments repeated to match, each sample's copies adjacent)."""
        if not self.packed:
            return tensors[0]
        batch = tensors[0].shape[0]
        copies = batch // max(self.batch, 1)
        arguments = [a.repeat_interleave(copies, 0) if copies != 1 else a for a in self._argument_tensors()]
        return torch.cat([_flat(t, batch) for t in (*tensors, *arguments)], dim=1)

    def baseline(self, baselines, name: str = "baselines") -> torch.Tensor:
        """Captum's baselines (None, a number, a tensor [B or 1, *in], or a tuple of those per input) as one
        engine-shaped tensor [B or 1, *x.shape[1:]]; the per-sample arguments' columns hold their values."""
        if isinstance(baselines, tuple):
            if len(baselines) != len(self.inputs):
                raise ValueError(f"{name} as a tuple needs one entry per input tensor ({len(self.inputs)}), "
                                 f"got {len(baselines)}")
            per_input = baselines
        elif len(self.inputs) > 1 and baselines is not None and not _is_number(baselines):
            raise ValueError(f"{name} for {len(self.inputs)} input tensors must be None, a number or a tuple with "
                             f"one entry per input, got a {type(baselines).__name__}")
        else:
            per_input = (baselines,) * len(self.inputs)
        tensors = [baseline_tensor(b, x, f"{name}[{k}]" if isinstance(baselines, tuple) else name)
                   for k, (b, x) in enumerate(zip(per_input, self.inputs))]
        if not self.packed:
            return tensors[0]
        rows = self.batch if self.per_sample or any(t.shape[0] != 1 for t in tensors) else 1
        parts = [_flat(t.expand(rows, *t.shape[1:]), rows) for t in tensors]
        parts += [_flat(a, rows) for a in self._argument_tensors()]
        return torch.cat(parts, dim=1)

    def unpack(self, result: torch.Tensor, row_axes: int) -> List[torch.Tensor]:
        """Engine results [B', *row_axes, *x.shape[1:]] as one tensor per input [B', *row_axes, *in_k]."""
        if not self.packed:
            return [result]
        lead = result.shape[:1 + row_axes]
        flat = result.reshape(*lead, math.prod(result.shape[1 + row_axes:]))
        pieces, start = [], 0
        for tensor, size in zip(self.inputs, self.input_sizes):
            pieces.append(flat[..., start:start + size].reshape(*lead, *tensor.shape[1:]))
            start += size
        return pieces


class EngineCache:
    """The engines of one attribution object, per call signature: the per-sample shapes of the inputs and
    of the per-sample arguments, dtype, device and the fixed arguments (numbers and lists by value, tensors
    by identity and version), since graph capture bakes those in; all rebuilt when the model changes
    (_still_valid)."""

    def __init__(self, forward_func: Callable):
        if not callable(forward_func):
            raise TypeError(f"forward_func must be an nn.Module or a callable, got {type(forward_func).__name__}")
        self.forward_func = forward_func
        self._direct = JacobianRows(forward_func)
        self._root = capture_root(forward_func)  # the modules forward_func runs, for _still_valid
        self._engines: "OrderedDict[tuple, tuple]" = OrderedDict()

    def call(self, inputs, additional_forward_args=None, name: str = "inputs") -> CaptumCall:
        tensors, given_as_tuple = as_tuple(inputs, name)
        batch = tensors[0].shape[0]
        arguments = format_arguments(additional_forward_args)
        per_sample = [k for k, a in enumerate(arguments or ())
                      if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch]
        for k in per_sample:
            _check_travels_exactly(arguments[k], tensors[0], f"additional_forward_args[{k}]")
        key = (tuple(tuple(t.shape[1:]) for t in tensors),
               tuple((tuple(arguments[k].shape[1:]), arguments[k].dtype) for k in per_sample), tensors[0].dtype,
               tensors[0].device,
               tuple(_fixed_key(a) for k, a in enumerate(arguments or ()) if k not in per_sample)
               if arguments is not None else None, tuple(per_sample))
        engine = self._engines.get(key)
        if engine is not None and not self._still_valid(engine):
            self._engines.clear()  # every engine, the direct one too, was built for the old model
            self._direct = JacobianRows(self.forward_func)
            engine = None
        if engine is None:
            engine = self._engines[key] = self._engine(tensors, arguments, per_sample)
            if len(self._engines) > MAX_CACHED_ENGINES:
                self._engines.popitem(last=False)
        else:
            self._engines.move_to_end(key)
        rows, output_shape, packed, _ = engine
        return CaptumCall(tensors, given_as_tuple, arguments, per_sample, rows, output_shape, packed)

    def _still_valid(self, engine) -> bool:
        """Whether the model is still the one the engine was built for: the same module objects, parameter
        shapes and training flags (a replaced or appended layer may change the output shape)."""
        return _same_layout(engine[3], _layout(self._root))

    def _engine(self, tensors, arguments, per_sample):
        self._direct._check_eval_mode()  # before the probe, which would update BatchNorm statistics or draw dropout
        layout = _layout(self._root)
        model = _WithArguments(self.forward_func, len(tensors), arguments, per_sample)
        engine_inputs = (*tensors, *(arguments[k] for k in per_sample))
        probes = [t[:1] if t.shape[0] else t.new_zeros((1, *t.shape[1:])) for t in engine_inputs]
        with torch.no_grad():
            output = model(*probes)
        if not isinstance(output, torch.Tensor) or output.dim() < 1 or output.shape[0] != 1:
            shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"forward_func must return a tensor [B, *out] that keeps the batch dimension; one sample "
                             f"in gave {shape}")
        output_shape = tuple(output.shape[1:])
        if len(tensors) == 1 and tensors[0].dim() >= 2 and not per_sample and len(output_shape) == 1:
            rows = self._direct if arguments is None else JacobianRows(model)
            return rows, output_shape, False, layout
        packed = PackedModel(model, [t.shape[1:] for t in engine_inputs], [math.prod(output_shape)])
        return JacobianRows(packed, self._direct.mode), output_shape, True, layout


def _flat(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows, *shape] as [rows, prod(shape)] (explicit: -1 is ambiguous for an empty batch)."""
    return tensor.reshape(rows, math.prod(tensor.shape[1:]))


def _check_travels_exactly(argument: torch.Tensor, x: torch.Tensor, name: str) -> None:
    """A per-sample argument rides in the inputs' floating dtype: it must convert there and back unchanged
    (integers, e.g. token ids or masks, up to the dtype's exact range; bool; a floating dtype no wider)."""
    if argument.device != x.device:
        raise NotImplementedError(f"{name} is a per-sample tensor (its dim 0 is the batch) on {argument.device}, the "
                                  f"inputs on {x.device}: per-sample arguments travel with the inputs, on their device")
    if argument.is_complex():
        fits = False
    elif argument.is_floating_point():
        fits = torch.promote_types(argument.dtype, x.dtype) == x.dtype
    elif argument.dtype == torch.bool or argument.numel() == 0:
        fits = True
    else:  # every integer up to 2 / eps (2 ** (mantissa bits + 1)) is exact
        fits = int(argument.abs().max()) <= 2 / torch.finfo(x.dtype).eps
    if not fits:
        raise NotImplementedError(
            f"{name} is a per-sample tensor (its dim 0 is the batch) of dtype {argument.dtype}; per-sample arguments "
            f"travel with the inputs in one {x.dtype} tensor, which cannot hold its values exactly")


def format_arguments(additional_forward_args) -> Optional[tuple]:
    """Captum's form: None, a tuple of arguments, or one argument (made a one-element tuple)."""
    if additional_forward_args is None:
        return None
    return additional_forward_args if isinstance(additional_forward_args, tuple) else (additional_forward_args,)


def _fixed_key(argument):
    if isinstance(argument, torch.Tensor):
        return ("tensor", id(argument), argument._version)
    return (type(argument).__name__, repr(argument))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
