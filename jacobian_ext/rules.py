"""The rule table: which modules run on a native C++ rule, and how they are encoded in a plan.

Adding a native activation is one row of csrc/jacext/activations.def (with its formulas in rule_math.h)
and one row of ACTIVATIONS here; another native layer one kernel file per backend, one schema line and
one entry here.
"""
import functools
from dataclasses import dataclass
from numbers import Real
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


# What a subclass of a torch layer may define and still compute exactly its parent's forward.
_HARMLESS_METHODS = {"__init__", "extra_repr", "reset_parameters", "__repr__"}


def rule_type(module: nn.Module) -> type:
    """The class whose rule applies to `module`: its own type, or, for a subclass of a torch layer that
    defines no method but __init__ (and extra_repr, reset_parameters), that torch layer, since it runs the
    parent's forward unchanged. A subclass that overrides forward, or any method forward may call, keeps
    its own type: it is traced into (graph capture) or runs on the fallback, which is always correct."""
    cls = type(module)
    if cls.__module__.startswith("torch.nn"):
        return cls
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.nn"):
            return klass
        if any(name not in _HARMLESS_METHODS and (callable(value) or isinstance(value, (property, staticmethod, classmethod)))
               for name, value in vars(klass).items()):
            return cls
    return cls


def read_tensor(module: nn.Module, name: str):
    """module.<name> as it is now: a registered parameter, buffer or submodule straight from its dict (plans
    read their tensors at every call, and nn.Module.__getattr__ costs several dict lookups there), else getattr."""
    if name in module._parameters:
        return module._parameters[name]
    if name in module._buffers:
        return module._buffers[name]
    if name in module._modules:
        return module._modules[name]
    return getattr(module, name)


def read_path(source, target: str):
    """source.<target> for a dotted path (a get_attr node's target), each module step read as read_tensor."""
    value = source
    for part in target.split(".") if target else ():
        value = read_tensor(value, part) if isinstance(value, nn.Module) else getattr(value, part)
    return value


def tensor_getter(owner, name: str) -> Callable[[], Any]:
    """A getter of owner.<name> for a plan's per-call parameter list (read_tensor for a module; any other
    owner by its own tensor_getter where it has one (a traced call's stand-in for a module), else by getattr)."""
    if isinstance(owner, nn.Module):
        return functools.partial(read_tensor, owner, name)
    own_getter = getattr(type(owner), "tensor_getter", None)
    return own_getter(owner, name) if own_getter is not None else functools.partial(getattr, owner, name)


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
        return NativeRule("linear_no_bias", lambda m: (read_tensor(m, "weight"),))
    return NativeRule("linear", lambda m: (read_tensor(m, "weight"), read_tensor(m, "bias")))


def _number(value) -> str:
    # repr of a Python float is the shortest string that reads back as the same double (C++ strtod).
    return repr(float(value))


@dataclass(frozen=True)
class ActivationRow:
    """One native element-wise activation, the Python side of its row in csrc/jacext/activations.def:
    the module type and functional forms it matches, its arguments, and its plain-PyTorch replay."""

    name: str  # the ops' grammar name (ops.py)
    module: type  # matched by exact type: a subclass may override forward
    functions: tuple  # torch functions and Tensor method names (in-place variants included)
    # The arguments after the input, (name, default), in the functional form's positional order and named
    # as the module's attributes; the numbers among them follow the name in the spec ("leaky_relu:0.2").
    arguments: tuple = ()
    fixed: tuple = ()  # (name, value) of non-numeric arguments that select this row (GELU's approximate)
    replay: Optional[Callable] = None  # replay(x, *numbers): the differentiable backward's recomputation

    def spec(self, values: Mapping[str, Any]) -> Optional[str]:
        """The activation string for these argument values, or None when they do not select this row or a
        number is not a plain number (e.g. a traced value)."""
        if any(values[name] != value for name, value in self.fixed):
            return None
        fixed = dict(self.fixed)
        numbers = [values[name] for name, _ in self.arguments if name not in fixed]
        if not all(isinstance(v, Real) and not isinstance(v, bool) for v in numbers):
            return None
        return ":".join([self.name] + [_number(v) for v in numbers])


ACTIVATIONS = (
    ActivationRow("relu", nn.ReLU, (torch.relu, torch.relu_, F.relu, F.relu_, "relu", "relu_"), replay=F.relu),
    ActivationRow("tanh", nn.Tanh, (torch.tanh, torch.tanh_, F.tanh, "tanh", "tanh_"), replay=torch.tanh),
    ActivationRow("sigmoid", nn.Sigmoid, (torch.sigmoid, torch.sigmoid_, F.sigmoid, "sigmoid", "sigmoid_"),
                  replay=torch.sigmoid),
    ActivationRow("gelu", nn.GELU, (F.gelu,), (("approximate", "none"),), (("approximate", "none"),),
                  replay=lambda x: F.gelu(x, approximate="none")),
    ActivationRow("gelu_tanh", nn.GELU, (F.gelu,), (("approximate", "none"),), (("approximate", "tanh"),),
                  replay=lambda x: F.gelu(x, approximate="tanh")),
    ActivationRow("silu", nn.SiLU, (F.silu,), replay=F.silu),
    ActivationRow("relu6", nn.ReLU6, (F.relu6,), replay=F.relu6),
    ActivationRow("leaky_relu", nn.LeakyReLU, (F.leaky_relu, F.leaky_relu_), (("negative_slope", 0.01),),
                  replay=F.leaky_relu),
    ActivationRow("elu", nn.ELU, (F.elu, F.elu_), (("alpha", 1.0),), replay=F.elu),
    ActivationRow("softplus", nn.Softplus, (F.softplus,), (("beta", 1.0), ("threshold", 20.0)), replay=F.softplus),
    ActivationRow("hardtanh", nn.Hardtanh, (F.hardtanh, F.hardtanh_), (("min_val", -1.0), ("max_val", 1.0)),
                  replay=F.hardtanh),
    ActivationRow("hardswish", nn.Hardswish, (F.hardswish,), replay=F.hardswish),
    ActivationRow("hardsigmoid", nn.Hardsigmoid, (F.hardsigmoid,), replay=F.hardsigmoid),
    ActivationRow("mish", nn.Mish, (F.mish,), replay=F.mish),
)
ACTIVATION_REPLAY: Dict[str, Callable] = {row.name: row.replay for row in ACTIVATIONS}
_BY_MODULE: Dict[type, list] = {}
_BY_FUNCTION: Dict[Any, list] = {}
for _row in ACTIVATIONS:
    _BY_MODULE.setdefault(_row.module, []).append(_row)
    for _fn in _row.functions:
        _BY_FUNCTION.setdefault(_fn, []).append(_row)


def activation_spec(module: nn.Module) -> Optional[str]:
    """The activation string of the pointwise ops for `module` (e.g. "leaky_relu:0.01"), or None when
    it has no native element-wise rule. By rule_type, like NATIVE_RULES."""
    for row in _BY_MODULE.get(rule_type(module), ()):
        spec = row.spec({name: getattr(module, name) for name, _ in row.arguments})
        if spec is not None:
            return spec
    return None


def functional_activation_spec(fn, args: Sequence = (), kwargs: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """The activation string for a functional call ``fn(input, *args[1:], **kwargs)`` — torch.relu,
    F.gelu(approximate=...), F.leaky_relu(x, 0.2), ... or a Tensor method name ("relu", "tanh",
    "sigmoid"); in-place variants included (the op computes a fresh output; whether the mutation
    matters to other users of the input is the caller's concern). `args` includes the input.
    None when `fn` is not a native activation or an argument is not a plain number (e.g. a traced value)."""
    for row in _BY_FUNCTION.get(fn, ()):
        remaining = dict(kwargs or {})
        remaining.pop("inplace", None)
        extra = list(args[1:])
        if len(extra) == len(row.arguments) + 1 and isinstance(extra[-1], bool):
            extra.pop()  # a positional inplace flag
        if len(extra) > len(row.arguments):
            return None
        values = {name: extra[i] if i < len(extra) else remaining.pop(name, default)
                  for i, (name, default) in enumerate(row.arguments)}
        if remaining:  # an argument this mapping does not know
            return None
        spec = row.spec(values)
        if spec is not None:
            return spec
    return None


_SOFTMAX_FUNCTIONS = {F.softmax: "softmax", torch.softmax: "softmax", "softmax": "softmax",
                      F.log_softmax: "log_softmax", torch.log_softmax: "log_softmax", "log_softmax": "log_softmax"}


def softmax_call(fn, args: Sequence, kwargs: Mapping[str, Any]) -> Optional[Tuple[str, Optional[int]]]:
    """("softmax" | "log_softmax", dim) for F.softmax(x, dim), torch.softmax, x.softmax(dim) (and the log
    forms), dim None when implicit; None for another function or a dtype argument. `args` includes the input."""
    layer = _SOFTMAX_FUNCTIONS.get(fn)
    if layer is None:
        return None
    kwargs = dict(kwargs)
    kwargs.pop("_stacklevel", None)  # F.softmax's warning depth, recorded by fx
    if kwargs.pop("dtype", None) is not None or set(kwargs) - {"dim"} or len(args) > 2:
        return None
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    return (layer, dim) if dim is None or isinstance(dim, int) else None


def functional_softmax_layer(fn, args: Sequence, kwargs: Mapping[str, Any], input_shape) -> Optional[str]:
    """"softmax" or "log_softmax" for a softmax_call over the single feature axis of a [B, H] input; None
    otherwise (another axis, an implicit dim)."""
    call = softmax_call(fn, args, kwargs)
    if call is None or len(input_shape) != 1:
        return None
    layer, dim = call
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
    **{row.module: _activation for row in ACTIVATIONS},
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


# Layers outside torch.nn that are the identity in eval mode and randomise samples in training mode (which is
# rejected before planning, as Dropout's is), by qualified class name so that neither library is imported.
RANDOM_IN_TRAINING_CLASSES = {
    "torchvision.ops.stochastic_depth.StochasticDepth",
    "timm.layers.drop.DropPath",
    "timm.models.layers.drop.DropPath",
}


def _qualified_name(obj) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"


def is_random_in_training(module: nn.Module) -> bool:
    """Dropout of any kind, stochastic depth, drop path: random in training mode, the identity in eval."""
    return isinstance(module, nn.modules.dropout._DropoutNd) or _qualified_name(type(module)) in RANDOM_IN_TRAINING_CLASSES


# Their functional forms: (position of the `training` argument, its default), by function or qualified name.
_RANDOM_IN_TRAINING_FUNCTIONS = {
    F.dropout: (2, True), F.dropout1d: (2, True), F.dropout2d: (2, True), F.dropout3d: (2, True),
    F.alpha_dropout: (2, False), F.feature_alpha_dropout: (2, False),
    "torchvision.ops.stochastic_depth.stochastic_depth": (3, True),
}


def functional_identity_in_eval(fn, args: Sequence, kwargs: Mapping[str, Any]) -> bool:
    """Whether ``fn(*args, **kwargs)`` is functional dropout or stochastic depth called with training=False
    (a constant in the captured graph), which is the identity. `args` includes the input."""
    key = fn if fn in _RANDOM_IN_TRAINING_FUNCTIONS else _qualified_name(fn) if callable(fn) else None
    if key not in _RANDOM_IN_TRAINING_FUNCTIONS:
        return False
    position, default = _RANDOM_IN_TRAINING_FUNCTIONS[key]
    training = kwargs.get("training", args[position] if len(args) > position else default)
    return training is False


def native_rule(module: nn.Module, input_shape: Tuple[int, ...]) -> Optional[NativeRule]:
    """The native rule for `module` applied to per-sample inputs of `input_shape`, or None."""
    kind = rule_type(module)
    rule = NATIVE_RULES.get(kind)
    if rule is None and _qualified_name(kind) in RANDOM_IN_TRAINING_CLASSES:
        rule = _reshape  # the identity in eval mode
    return None if rule is None else rule(module, input_shape)
