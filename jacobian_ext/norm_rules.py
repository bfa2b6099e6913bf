"""Layer norm, group norm and RMS norm over any trailing axes, in the interface of spatial_rules.SpatialCall:
forward(input, jac), reverse(input, cotangent) and encode(...) for the program. Group norm is the layer norm of
each group of channels plus a per-channel affine map; RMS norm is a few torch ops on the blocks."""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .program import entry
from . import spatial_rules
from .blocks import IDENTITY, NodeRule, explicit_block
from .rules import tensor_getter
from .feature_rules import NdOpRule


class _LayerNormCall:
    """nn.LayerNorm's native rule in the interface of spatial_rules.SpatialCall."""

    def __init__(self, module: nn.LayerNorm):
        self.module = module

    def forward(self, input, jac):
        m = self.module
        return ops.layer_norm_jac_forward(input, jac, list(m.normalized_shape), m.weight, m.bias, m.eps)

    def reverse(self, input, cotangent):
        m = self.module
        return ops.layer_norm_jac_reverse(input, cotangent, list(m.normalized_shape), m.weight, m.eps)

    def encode(self, module, sources, input_shape, output_shape):
        return [spatial_rules.encode_with_module_params(
            module, "layer_norm", sources, dict(shape=list(module.normalized_shape), eps=float(module.eps), weight=module.weight is not None,
                 bias=module.bias is not None),
            ("weight", "bias"))]


class _GroupNormCall:
    """nn.GroupNorm as the layer norm of each group of channels (the per-sample input [C, *spatial] viewed as
    [G, C / G * spatial], normalised over its last axis, and viewed back), then the per-channel affine map:
    the layer norm's full rule, no new kernel."""

    def __init__(self, module: nn.GroupNorm, input_shape):
        self.module, self.input_shape = module, tuple(input_shape)
        self.grouped = (module.num_groups, math.prod(input_shape) // module.num_groups)
        self.channel_shape = (module.num_channels,) + (1,) * (len(input_shape) - 1)

    def _affine(self):
        m = self.module
        return (m.weight.reshape(self.channel_shape), m.bias.reshape(self.channel_shape)) if m.affine else (None, None)

    def forward(self, input, jac):
        batch = input.shape[0]
        grouped_jac = None if jac is None else jac.reshape(batch, *self.grouped, jac.shape[-1])
        output, jac_out = ops.layer_norm_jac_forward(input.reshape(batch, *self.grouped), grouped_jac,
                                                     [self.grouped[1]], None, None, self.module.eps)
        output = output.reshape(batch, *self.input_shape)
        jac_out = jac_out.reshape(batch, *self.input_shape, jac_out.shape[-1])
        weight, bias = self._affine()
        if weight is not None:
            output, jac_out = output * weight + bias, jac_out * weight.unsqueeze(-1)
        return output, jac_out

    def reverse(self, input, cotangent):
        batch = input.shape[0]
        weight, _ = self._affine()
        if weight is not None:
            # The identity block too, scaled: its rows are the output features.
            cotangent = explicit_block(IDENTITY if cotangent is None else cotangent, batch, self.input_shape, input)
            cotangent = cotangent * weight
        grouped = None if cotangent is None else cotangent.reshape(batch, cotangent.shape[1], *self.grouped)
        pulled = ops.layer_norm_jac_reverse(input.reshape(batch, *self.grouped), grouped, [self.grouped[1]], None,
                                            self.module.eps)
        return pulled.reshape(batch, pulled.shape[1], *self.input_shape)

    def encode(self, module, sources, input_shape, output_shape):
        """The program reads the module's own [C] weight and bias (so that an exported graph finds them among
        the model's parameters); they broadcast over the last axis, so the affine map runs on [*spatial, C]."""
        entries = [(entry("reshape", sources, shape=list(self.grouped)), []),
                   (entry("layer_norm", shape=[self.grouped[1]], eps=float(module.eps), weight=False, bias=False), [])]
        if not module.affine:
            return entries + [(entry("reshape", shape=list(self.input_shape)), [])]
        channels = module.num_channels
        return entries + [
            (entry("reshape", shape=[channels, self.grouped[0] * self.grouped[1] // channels]), []),
            (entry("permute", dims=[1, 0]), []),
            (entry("scale", divide=False), [tensor_getter(module, "weight")]),
            (entry("add", coef="1.0", offset_param=1.0), [tensor_getter(module, "bias")]),
            (entry("permute", dims=[1, 0]), []),
            (entry("reshape", shape=list(self.input_shape)), []),
        ]


class _RMSNormCall:
    """nn.RMSNorm / F.rms_norm, y = w x r with r = (mean(x^2) + eps)^(-1/2) over the normalised trailing axes:
    its Jacobian is diag(w) (r I - r^3 x x^T / n) per group, applied to tangents as w (r t - r^3 x mean(x t))
    and to cotangents as r u - r^3 x mean(x u) with u = g w (the matrix in brackets is symmetric). A few
    torch ops on the blocks, no kernel of its own; the program's rms_norm entry runs the same rule in ATen."""

    def __init__(self, module, input_shape):
        self.module, self.input_shape = module, tuple(input_shape)
        self.dims = tuple(range(-len(module.normalized_shape), 0))

    def _eps(self, dtype):
        eps = self.module.eps
        return torch.finfo(dtype).eps if eps is None else eps

    def _scale(self, input):
        """r with the normalised axes kept (size 1), as F.rms_norm computes it."""
        return torch.rsqrt(input.pow(2).mean(self.dims, keepdim=True) + self._eps(input.dtype))

    def _project(self, input, block):
        """r b - r^3 x mean(x b) for a block b [B, R, *shape] (rows second)."""
        x, r = input.unsqueeze(1), self._scale(input).unsqueeze(1)
        return r * block - (r * r * r) * x * (x * block).mean(self.dims, keepdim=True)

    def forward(self, input, jac):
        m = self.module
        output = F.rms_norm(input, m.normalized_shape, m.weight, m.eps)
        tangent = explicit_block(IDENTITY, input.shape[0], self.input_shape, input) if jac is None else jac.movedim(-1, 1)
        projected = self._project(input, tangent)
        if m.weight is not None:
            projected = projected * m.weight
        return output, projected.movedim(1, -1)

    def reverse(self, input, cotangent):
        block = explicit_block(IDENTITY if cotangent is None else cotangent, input.shape[0], self.input_shape, input)
        if self.module.weight is not None:
            block = block * self.module.weight
        return self._project(input, block)

    def encode(self, module, sources, input_shape, output_shape):
        # No eps= in the entry stands for eps=None: the dtype's epsilon, resolved where the dtype is known.
        eps = {} if module.eps is None else {"eps": float(module.eps)}
        attributes = dict(shape=list(module.normalized_shape), **eps, weight=module.weight is not None)
        return [spatial_rules.encode_with_module_params(module, "rms_norm", sources, attributes, ("weight",))]


def _leading_axes(normalized_shape, input_shape) -> Optional[int]:
    """How many per-sample axes come before a norm's normalised ones (they end the per-sample shape), or None
    when normalized_shape does not end input_shape."""
    normalized, leading = tuple(normalized_shape), len(input_shape) - len(normalized_shape)
    return leading if leading >= 0 and tuple(input_shape[leading:]) == normalized else None


def rms_norm_rule(module, input_shape, out_numel: int) -> Optional[NodeRule]:
    leading = _leading_axes(module.normalized_shape, input_shape)
    if leading is None:
        return None
    return NdOpRule(module, input_shape, _RMSNormCall, "rms_norm", 6 * out_numel, position_axes=leading)


def group_norm_rule(module: nn.GroupNorm, input_shape, out_numel: int) -> Optional[NodeRule]:
    if not input_shape or input_shape[0] != module.num_channels:
        return None
    return NdOpRule(module, input_shape, _GroupNormCall, "group_norm", 8 * out_numel)


def layer_norm_rule(module: nn.LayerNorm, input_shape, out_numel: int) -> Optional[NodeRule]:
    leading = _leading_axes(module.normalized_shape, input_shape)
    if leading is None:
        return None
    return NdOpRule(module, input_shape, lambda m, shape: _LayerNormCall(m), "layer_norm", 8 * out_numel,
                    position_axes=leading)
