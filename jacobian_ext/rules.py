"""The rule table: which modules run on a native C++ rule, and how they are encoded in a plan.

Adding a native layer touches one kernel file per backend, one schema line and one entry here.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
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


def _activation(name: str):
    return lambda module, input_shape: NativeRule(name)


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
    nn.ReLU: _activation("relu"),
    nn.Tanh: _activation("tanh"),
    nn.Sigmoid: _activation("sigmoid"),
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


def has_native_rule(module: nn.Module) -> bool:
    """Whether `module`'s type has a rule at all (before shapes are known)."""
    return type(module) in NATIVE_RULES


_MODULE_ACTIVATIONS = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
_FUNCTIONAL_ACTIVATIONS = {torch.relu: "relu", torch.nn.functional.relu: "relu", torch.tanh: "tanh",
                           torch.sigmoid: "sigmoid", "relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}


def activation_spec(module: nn.Module) -> Optional[str]:
    """The pointwise op's activation string for an activation module, or None."""
    return _MODULE_ACTIVATIONS.get(type(module))


def functional_activation_spec(fn, args, kwargs) -> Optional[str]:
    """The activation string for a functional call (fn: a function, or a Tensor method's name), or None."""
    try:
        return _FUNCTIONAL_ACTIVATIONS.get(fn)
    except TypeError:  # unhashable target
        return None
