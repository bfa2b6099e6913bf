"""The rule table: which modules run on a native C++ rule, and how they are encoded in a plan.

Adding a native layer touches one kernel file per backend, one schema line and one entry here.
"""
from dataclasses import dataclass
from numbers import Real
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class NativeRule:
    """How one module runs natively: its layer name in the op's plan encoding (``None`` for a pure
    reshape, which is the identity on the flattened Jacobian) and how to read its parameters."""

    layer: Optional[str]
    params: Callable[[nn.Module], Tuple[torch.Tensor, ...]] = lambda module: ()

    @property
    def is_reshape(self) -> bool:
        return self.layer is None


RESHAPE = NativeRule(None)


def _linear(module: nn.Linear, input_shape) -> Optional[NativeRule]:
    # The native rule works on [B, in_features]; a Linear over the last axis of an N-d input is
    # block-diagonal on the flattened features and runs on the fallback.
    if len(input_shape) != 1:
        return None
    if module.bias is None:
        return NativeRule("linear_no_bias", lambda m: (m.weight,))
    return NativeRule("linear", lambda m: (m.weight, m.bias))


def _number(value) -> str:
    # repr of a Python float is the shortest string that reads back as the same double (C++ strtod).
    return repr(float(value))


_GELU_FORMS = {"none": "gelu", "tanh": "gelu_tanh"}  # approximate= -> activation string

# Module type -> its activation string (the ops' grammar, see ops.py), read from the module's attributes.
_MODULE_ACTIVATIONS: Dict[type, Callable[[nn.Module], Optional[str]]] = {
    nn.ReLU: lambda m: "relu",
    nn.Tanh: lambda m: "tanh",
    nn.Sigmoid: lambda m: "sigmoid",
    nn.GELU: lambda m: _GELU_FORMS.get(m.approximate),
    nn.SiLU: lambda m: "silu",
    nn.ReLU6: lambda m: "relu6",
    nn.LeakyReLU: lambda m: f"leaky_relu:{_number(m.negative_slope)}",
    nn.ELU: lambda m: f"elu:{_number(m.alpha)}",
    nn.Softplus: lambda m: f"softplus:{_number(m.beta)}:{_number(m.threshold)}",
    nn.Hardtanh: lambda m: f"hardtanh:{_number(m.min_val)}:{_number(m.max_val)}",
}


def activation_spec(module: nn.Module) -> Optional[str]:
    """The activation string of the pointwise ops for `module` (e.g. "leaky_relu:0.01"), or None when
    it has no native element-wise rule. Exact types only, like NATIVE_RULES."""
    spec = _MODULE_ACTIVATIONS.get(type(module))
    return None if spec is None else spec(module)


# Functional form -> (activation name, its parameters after the input as (name, default) pairs).
_FUNCTIONAL_ACTIVATIONS: Dict[Any, Tuple[str, Tuple[Tuple[str, Any], ...]]] = {}
for _fns, _name, _params in [
    ((torch.relu, torch.relu_, F.relu, F.relu_, "relu", "relu_"), "relu", ()),
    ((torch.tanh, torch.tanh_, F.tanh, "tanh", "tanh_"), "tanh", ()),
    ((torch.sigmoid, torch.sigmoid_, F.sigmoid, "sigmoid", "sigmoid_"), "sigmoid", ()),
    ((F.gelu,), "gelu", (("approximate", "none"),)),
    ((F.silu,), "silu", ()),
    ((F.relu6,), "relu6", ()),
    ((F.leaky_relu, F.leaky_relu_), "leaky_relu", (("negative_slope", 0.01),)),
    ((F.elu, F.elu_), "elu", (("alpha", 1.0),)),
    ((F.softplus,), "softplus", (("beta", 1.0), ("threshold", 20.0))),
    ((F.hardtanh, F.hardtanh_), "hardtanh", (("min_val", -1.0), ("max_val", 1.0))),
]:
    for _fn in _fns:
        _FUNCTIONAL_ACTIVATIONS[_fn] = (_name, _params)


def functional_activation_spec(fn, args: Sequence = (), kwargs: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """The activation string for a functional call ``fn(input, *args[1:], **kwargs)`` — torch.relu,
    F.gelu(approximate=...), F.leaky_relu(x, 0.2), ... or a Tensor method name ("relu", "tanh",
    "sigmoid"); in-place variants included (the op computes a fresh output; whether the mutation
    matters to other users of the input is the caller's concern). `args` includes the input.
    None when `fn` is not a native activation or a parameter is not a plain number (e.g. a traced value)."""
    entry = _FUNCTIONAL_ACTIVATIONS.get(fn)
    if entry is None:
        return None
    name, params = entry
    kwargs = dict(kwargs or {})
    kwargs.pop("inplace", None)
    extra = list(args[1:])
    if len(extra) == len(params) + 1 and isinstance(extra[-1], bool):
        extra.pop()  # a positional inplace flag
    if len(extra) > len(params):
        return None
    values = {}
    for i, (param, default) in enumerate(params):
        values[param] = extra[i] if i < len(extra) else kwargs.pop(param, default)
    if kwargs:  # an argument this mapping does not know
        return None
    if name == "gelu":
        return _GELU_FORMS.get(values["approximate"])
    if not all(isinstance(v, Real) and not isinstance(v, bool) for v in values.values()):
        return None
    return ":".join([name] + [_number(v) for v in values.values()])


_SOFTMAX_FUNCTIONS = {F.softmax: "softmax", torch.softmax: "softmax", "softmax": "softmax",
                      F.log_softmax: "log_softmax", torch.log_softmax: "log_softmax", "log_softmax": "log_softmax"}


def functional_softmax_layer(fn, args: Sequence, kwargs: Mapping[str, Any], input_shape) -> Optional[str]:
    """"softmax" or "log_softmax" for F.softmax(x, dim), torch.softmax, x.softmax(dim) (and the log forms)
    over the single feature axis of a [B, H] input; None otherwise (another axis, an implicit dim, a dtype
    argument). `args` includes the input."""
    layer = _SOFTMAX_FUNCTIONS.get(fn)
    if layer is None or len(input_shape) != 1:
        return None
    kwargs = dict(kwargs)
    kwargs.pop("_stacklevel", None)  # F.softmax's warning depth, recorded by fx
    if kwargs.pop("dtype", None) is not None or set(kwargs) - {"dim"} or len(args) > 2:
        return None
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    return layer if dim in (1, -1) else None


def _activation(module, input_shape) -> Optional[NativeRule]:
    spec = activation_spec(module)
    return None if spec is None else NativeRule(spec)


def _softmax(name: str):
    def rule(module, input_shape) -> Optional[NativeRule]:
        # Native only over the single feature axis of a [B, H] input (dim=None means dim 1 there).
        if len(input_shape) == 1 and module.dim in (None, 1, -1):
            return NativeRule(name)
        return None

    return rule


def _reshape(module, input_shape) -> NativeRule:
    return RESHAPE


def _flatten(module: nn.Flatten, input_shape) -> Optional[NativeRule]:
    # Flattening feature axes keeps the row-major order of a sample's features: a no-op on J.
    # Flattening into the batch axis (start_dim 0) mixes samples and is not a per-sample map.
    return RESHAPE if module.start_dim != 0 and module.start_dim != -(len(input_shape) + 1) else None


def _unflatten(module: nn.Unflatten, input_shape) -> Optional[NativeRule]:
    dim = module.dim if isinstance(module.dim, int) else None
    return RESHAPE if dim is not None and dim != 0 and dim != -(len(input_shape) + 1) else None


# Exact types: a subclass may override forward (LoRA layers, quantised Linear, ...) and then runs on
# the fallback, which is always correct.
NATIVE_RULES: Dict[type, Callable[[nn.Module, Tuple[int, ...]], Optional[NativeRule]]] = {
    nn.Linear: _linear,
    **{activation_type: _activation for activation_type in _MODULE_ACTIVATIONS},
    nn.Softmax: _softmax("softmax"),
    nn.LogSoftmax: _softmax("log_softmax"),
    nn.Flatten: _flatten,
    nn.Unflatten: _unflatten,
    nn.Identity: _reshape,
    # Dropout is the identity in eval mode; training mode is rejected before planning.
    nn.Dropout: _reshape,
    nn.Dropout1d: _reshape,
    nn.Dropout2d: _reshape,
    nn.Dropout3d: _reshape,
    nn.AlphaDropout: _reshape,
    nn.FeatureAlphaDropout: _reshape,
}


def native_rule(module: nn.Module, input_shape: Tuple[int, ...]) -> Optional[NativeRule]:
    """The native rule for `module` applied to per-sample inputs of `input_shape`, or None."""
    rule = NATIVE_RULES.get(type(module))
    return None if rule is None else rule(module, input_shape)
