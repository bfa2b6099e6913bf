"""Parameters of the native rules on N-d per-sample features (conv, batch norm, pooling).

Each ``*_params(module, input_shape)`` reads a module and its per-sample input shape (without the
batch axis) and returns the keyword arguments of the forward op ``ops.<op>_jac_forward(input, jac,
**params)``, or ``None`` when the module has no native rule in that configuration (it then runs on
the fallback). ``native_call`` bundles the op with its parameters and calls either direction.
1-d pooling runs on the 2-d ops over ``[*planes, 1, L]`` (views only). Exact module types only: a
subclass may override forward.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

from torch import Tensor, nn
from torch.nn.modules.utils import _pair, _single

from . import ops
from .program import entry
from .rules import rule_type, tensor_getter


def conv_params(module: nn.Module, input_shape: Sequence[int]) -> Optional[dict]:
    """Conv1d/2d/3d with zero padding on a per-sample [C_in, *spatial] input."""
    spatial_dims = len(module.kernel_size)
    if module.padding_mode != "zeros" or len(input_shape) != spatial_dims + 1:
        return None
    if isinstance(module.padding, str):
        if module.padding == "valid":
            padding = [0] * spatial_dims
        else:  # "same": symmetric only when every dilated kernel extent is odd
            extents = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            if any(extent % 2 for extent in extents):
                return None
            padding = [extent // 2 for extent in extents]
    else:
        padding = list(module.padding)
    return dict(weight=module.weight, bias=module.bias, stride=list(module.stride), padding=padding,
                dilation=list(module.dilation), groups=module.groups)


def batch_norm_params(module: nn.Module, input_shape: Sequence[int]) -> Optional[dict]:
    """BatchNorm1d ([C] or [C, L] per sample) and BatchNorm2d ([C, H, W]) in eval mode with running
    statistics: a per-channel affine map. Training mode normalises by batch statistics (not per-sample)."""
    feature_dims = (1, 2) if isinstance(module, nn.BatchNorm1d) else (3,)
    if module.training or module.running_mean is None or module.running_var is None:
        return None
    if len(input_shape) not in feature_dims or input_shape[0] != module.num_features:
        return None
    return dict(weight=module.weight, bias=module.bias, running_mean=module.running_mean,
                running_var=module.running_var, eps=float(module.eps))


def _pool_input(input_shape: Sequence[int]) -> bool:
    return len(input_shape) in (2, 3)  # [H, W] or [C, H, W]


def max_pool2d_params(module: nn.MaxPool2d, input_shape: Sequence[int]) -> Optional[dict]:
    if module.return_indices or not _pool_input(input_shape):
        return None
    return dict(kernel_size=list(_pair(module.kernel_size)), stride=list(_pair(module.stride)),
                padding=list(_pair(module.padding)), dilation=list(_pair(module.dilation)),
                ceil_mode=bool(module.ceil_mode))


def avg_pool2d_params(module: nn.AvgPool2d, input_shape: Sequence[int]) -> Optional[dict]:
    if not _pool_input(input_shape):
        return None
    return dict(kernel_size=list(_pair(module.kernel_size)), stride=list(_pair(module.stride)),
                padding=list(_pair(module.padding)), ceil_mode=bool(module.ceil_mode),
                count_include_pad=bool(module.count_include_pad), divisor_override=module.divisor_override)


def adaptive_avg_pool2d_params(module: nn.AdaptiveAvgPool2d, input_shape: Sequence[int]) -> Optional[dict]:
    """output_size entries that are None keep the input's size."""
    if not _pool_input(input_shape):
        return None
    output_size = [size if size is not None else input_shape[-2 + axis]
                   for axis, size in enumerate(_pair(module.output_size))]
    return dict(output_size=output_size)


# 1-d pooling over [*planes, L] as 2-d pooling over [*planes, 1, L]: a window of height 1.

def _pool1d_input(input_shape: Sequence[int]) -> bool:
    return len(input_shape) in (1, 2)  # [L] or [C, L]


def max_pool1d_params(module: nn.MaxPool1d, input_shape: Sequence[int]) -> Optional[dict]:
    if module.return_indices or not _pool1d_input(input_shape):
        return None
    return dict(kernel_size=[1, *_single(module.kernel_size)], stride=[1, *_single(module.stride)],
                padding=[0, *_single(module.padding)], dilation=[1, *_single(module.dilation)],
                ceil_mode=bool(module.ceil_mode))


def avg_pool1d_params(module: nn.AvgPool1d, input_shape: Sequence[int]) -> Optional[dict]:
    if not _pool1d_input(input_shape):
        return None
    return dict(kernel_size=[1, *_single(module.kernel_size)], stride=[1, *_single(module.stride)],
                padding=[0, *_single(module.padding)], ceil_mode=bool(module.ceil_mode),
                count_include_pad=bool(module.count_include_pad), divisor_override=None)


def adaptive_avg_pool1d_params(module: nn.AdaptiveAvgPool1d, input_shape: Sequence[int]) -> Optional[dict]:
    if not _pool1d_input(input_shape):
        return None
    return dict(output_size=[1, *_single(module.output_size)])


# module type -> (op name, params function)
SPATIAL_RULES: Dict[type, Tuple[str, Callable[[nn.Module, Sequence[int]], Optional[dict]]]] = {
    nn.Conv1d: ("conv", conv_params),
    nn.Conv2d: ("conv", conv_params),
    nn.Conv3d: ("conv", conv_params),
    nn.BatchNorm1d: ("batch_norm", batch_norm_params),
    nn.BatchNorm2d: ("batch_norm", batch_norm_params),
    nn.MaxPool2d: ("max_pool2d", max_pool2d_params),
    nn.AvgPool2d: ("avg_pool2d", avg_pool2d_params),
    nn.AdaptiveAvgPool2d: ("adaptive_avg_pool2d", adaptive_avg_pool2d_params),
    nn.MaxPool1d: ("max_pool2d", max_pool1d_params),
    nn.AvgPool1d: ("avg_pool2d", avg_pool1d_params),
    nn.AdaptiveAvgPool1d: ("adaptive_avg_pool2d", adaptive_avg_pool1d_params),
}
_POOL_1D = (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d)

# The forward-op parameters that the reverse op does not take (it needs no bias or mean).
_FORWARD_ONLY = {"conv": ("bias",), "batch_norm": ("bias", "running_mean")}


@dataclass(frozen=True)
class SpatialCall:
    """One layer's native rule: ``forward(input, jac) -> (output, jac_out)`` and
    ``reverse(input, cotangent) -> cotangent_in`` in the layout of ops.py."""

    op: str
    params: dict
    as_2d: bool = False  # a 1-d pooling on [B, *planes, L], run on [B, *planes, 1, L]

    def forward(self, input: Tensor, jac: Optional[Tensor]):
        if self.as_2d:  # jac [B, *planes, L, D] -> [B, *planes, 1, L, D]
            input, jac = input.unsqueeze(-2), None if jac is None else jac.unsqueeze(-3)
        output, jac_out = getattr(ops, f"{self.op}_jac_forward")(input, jac, **self.params)
        return (output.squeeze(-2), jac_out.squeeze(-3)) if self.as_2d else (output, jac_out)

    def reverse(self, input: Tensor, cotangent: Optional[Tensor]) -> Tensor:
        params = {k: v for k, v in self.params.items() if k not in _FORWARD_ONLY.get(self.op, ())}
        if self.as_2d:  # cotangent [B, C, *planes, L_out] -> [B, C, *planes, 1, L_out]
            input, cotangent = input.unsqueeze(-2), None if cotangent is None else cotangent.unsqueeze(-2)
        result = getattr(ops, f"{self.op}_jac_reverse")(input, cotangent, **params)
        return result.squeeze(-2) if self.as_2d else result

    def encode(self, module: nn.Module, sources, input_shape, output_shape):
        """The op as program entries (a 1-d pooling between reshapes to and from [*planes, 1, L])."""
        entries = []
        if self.as_2d:
            entries.append((entry("reshape", sources, shape=[*input_shape[:-1], 1, input_shape[-1]]), []))
            sources = ()
        entries.append(encode_with_module_params(module, self.op, sources, _PROGRAM_ATTRIBUTES[self.op](self.params),
                                                 _PROGRAM_TENSORS.get(self.op, ())))
        if self.as_2d:
            entries.append((entry("reshape", shape=list(output_shape)), []))
        return entries


def encode_with_module_params(module: nn.Module, kind: str, sources, attributes: dict, names: Sequence[str]):
    """(program entry, getters of the module's tensors `names` that are not None, read at call time)."""
    present = [name for name in names if getattr(module, name) is not None]
    getters = [tensor_getter(module, name) for name in present]
    return entry(kind, sources, **attributes), getters


# The program attributes of each op from its forward-op parameters (csrc/graph.cpp's grammar).
_PROGRAM_ATTRIBUTES = {
    "conv": lambda p: dict(stride=p["stride"], padding=p["padding"], dilation=p["dilation"], groups=p["groups"],
                           bias=p["bias"] is not None),
    "batch_norm": lambda p: dict(eps=p["eps"], weight=p["weight"] is not None, bias=p["bias"] is not None),
    "max_pool2d": lambda p: dict(kernel=p["kernel_size"], stride=p["stride"], padding=p["padding"],
                                 dilation=p["dilation"], ceil=p["ceil_mode"]),
    "avg_pool2d": lambda p: dict(kernel=p["kernel_size"], stride=p["stride"], padding=p["padding"],
                                 ceil=p["ceil_mode"], count_include_pad=p["count_include_pad"],
                                 **({} if p["divisor_override"] is None else {"divisor": p["divisor_override"]})),
    "adaptive_avg_pool2d": lambda p: dict(size=p["output_size"]),
}
_PROGRAM_TENSORS = {"conv": ("weight", "bias"), "batch_norm": ("weight", "bias", "running_mean", "running_var")}


def native_call(module: nn.Module, input_shape: Sequence[int]) -> Optional[SpatialCall]:
    """The native rule of `module` on a per-sample input of `input_shape`, or None (fallback)."""
    entry = SPATIAL_RULES.get(rule_type(module))
    if entry is None:
        return None
    op, params_of = entry
    params = params_of(module, tuple(input_shape))
    return None if params is None else SpatialCall(op, params, as_2d=isinstance(module, _POOL_1D))
