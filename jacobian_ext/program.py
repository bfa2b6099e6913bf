"""The layer encoding of ``torch.ops.jacext.batch_jacobian`` (a chain, or a graph program) in plain PyTorch.

``replay(x, layers, params)`` computes the model the encoding describes, with ordinary torch ops: the
op's fake implementation runs it on fake tensors (output shapes under torch.compile and torch.export)
and its backward differentiates it (differentiable.py). The grammar is documented once, in
csrc/graph.cpp; ``entry(kind, **attributes)`` writes an entry in it, and ``is_graph_program`` says, as
the C++ op decides, whether an encoding is a graph program or a plain chain of layer names.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .rules import ACTIVATION_REPLAY

CHAIN_KINDS = ("linear", "linear_no_bias", "softmax", "log_softmax")
GRAPH_KINDS = ("roll", "flip", "pad", "normalize", "einsum",
               "conv", "batch_norm", "layer_norm", "rms_norm", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
               "linear_last_axis", "reshape", "permute", "mean", "sum", "cat", "add", "mul", "div", "scale", "slice",
               "gather", "index_select",
               "matmul", "softmax_axis", "log_softmax_axis", "attention")


def _text(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, tuple)):
        return ",".join(str(int(v)) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def entry(kind: str, inputs: Sequence[int] = (), **attributes) -> str:
    """One program entry: `kind in=.. key=value ...` (floats as repr, which round-trips exactly)."""
    parts = [kind]
    if inputs:
        parts.append(f"in={_text(list(inputs))}")
    parts += [f"{key}={_text(value)}" for key, value in attributes.items()]
    return " ".join(parts)


def is_graph_program(layers: Sequence[str]) -> bool:
    return any(" " in layer or layer in GRAPH_KINDS for layer in layers)


def parse(layer: str) -> Tuple[str, Dict[str, str]]:
    kind, *tokens = layer.split()
    return kind, dict(token.split("=", 1) for token in tokens)


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",")] if text else []


def _flag(attributes, key) -> bool:
    return attributes.get(key) == "1"


def _param_count(kind: str, a: Dict[str, str]) -> int:
    counts = {"linear": 2, "linear_no_bias": 1}
    if kind in counts:
        return counts[kind]
    if kind in ("conv", "linear_last_axis"):
        return 1 + _flag(a, "bias")
    if kind == "batch_norm":
        return 2 + _flag(a, "weight") + _flag(a, "bias")
    if kind in ("layer_norm", "rms_norm"):
        return _flag(a, "weight") + _flag(a, "bias")
    if kind in ("gather", "index_select"):
        return 1
    if kind == "einsum":
        return _ints(a["constants"]).count(1)
    if kind == "add":
        return int("offset_param" in a)
    if kind == "scale":
        return int("factor" not in a)
    if kind == "matmul":
        return int("constant" in a)
    if kind == "cat":
        return _ints(a.get("constants", "")).count(1)
    if kind == "attention":
        return int(_flag(a, "mask"))
    return 0


def _affine(a, params):
    weight = params.pop(0) if _flag(a, "weight") else None
    bias = params.pop(0) if _flag(a, "bias") else None
    return weight, bias


def _apply(kind: str, a: Dict[str, str], inputs: List[Tensor], params: List[Tensor]) -> Tensor:
    x = inputs[0]
    batch = x.shape[0]
    if kind == "linear":
        return F.linear(x, params[0], params[1])
    if kind == "linear_no_bias":
        return F.linear(x, params[0])
    if kind == "linear_last_axis":
        return F.linear(x, params[0], params[1] if len(params) > 1 else None)
    if kind in ("softmax", "log_softmax"):
        return (torch.softmax if kind == "softmax" else torch.log_softmax)(x, dim=-1)
    if kind == "roll":
        return torch.roll(x, _ints(a["shifts"]), [d + 1 for d in _ints(a["dims"])])
    if kind == "flip":
        return torch.flip(x, [d + 1 for d in _ints(a["dims"])])
    if kind == "pad":
        return F.pad(x, _ints(a["pad"]), value=float(a["value"]))
    if kind == "normalize":
        return F.normalize(x, dim=int(a["dim"]) + 1, eps=float(a["eps"]))
    if kind == "einsum":  # values and params interleaved as constants= says
        values, constants = iter(inputs), iter(params)
        operands = [next(constants) if flag else next(values) for flag in _ints(a["constants"])]
        return torch.einsum(a["equation"], *operands)
    if kind == "conv":
        spatial = x.dim() - 2
        conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
        return conv(x, params[0], params[1] if len(params) > 1 else None, _ints(a["stride"]), _ints(a["padding"]),
                    _ints(a["dilation"]), int(a["groups"]))
    if kind == "batch_norm":
        weight, bias = _affine(a, params)
        return F.batch_norm(x, params[0], params[1], weight, bias, False, 0.0, float(a["eps"]))
    if kind == "layer_norm":
        weight, bias = _affine(a, params)
        return F.layer_norm(x, _ints(a["shape"]), weight, bias, float(a["eps"]))
    if kind == "rms_norm":
        weight, _ = _affine(a, params)
        return F.rms_norm(x, _ints(a["shape"]), weight, float(a["eps"]) if "eps" in a else None)
    if kind == "max_pool2d":
        return F.max_pool2d(x, _ints(a["kernel"]), _ints(a["stride"]), _ints(a["padding"]), _ints(a["dilation"]),
                            _flag(a, "ceil"))
    if kind == "avg_pool2d":
        divisor = int(a["divisor"]) if "divisor" in a else None
        return F.avg_pool2d(x, _ints(a["kernel"]), _ints(a["stride"]), _ints(a["padding"]), _flag(a, "ceil"),
                            _flag(a, "count_include_pad"), divisor)
    if kind == "adaptive_avg_pool2d":
        return F.adaptive_avg_pool2d(x, _ints(a["size"]))
    if kind == "reshape":
        return x.reshape(batch, *_ints(a["shape"]))
    if kind == "permute":
        return x.permute(0, *(d + 1 for d in _ints(a["dims"])))
    if kind in ("mean", "sum"):
        dims = [d + 1 for d in _ints(a["dims"])]
        return (x.mean if kind == "mean" else x.sum)(dims, keepdim=_flag(a, "keepdim"))
    if kind == "cat":  # constants= interleaves params [1, ...], expanded over the batch, with the values
        values, constants = iter(inputs), iter(params)
        parts = [next(constants).expand(batch, *[-1] * (x.dim() - 1)) if flag else next(values)
                 for flag in _ints(a.get("constants", "")) or [0] * len(inputs)]
        return torch.cat(parts, int(a["dim"]) + 1)
    if kind == "slice":
        return x[(slice(None),) * (int(a["dim"]) + 1) + (slice(int(a["start"]), int(a["stop"]), int(a["step"])),)]
    if kind == "gather":  # an index of batch 1 broadcasts over the batch
        index = params[0]
        if index.shape[0] not in (1, batch):
            # The backward replays one sample at a time, where an index row per sample cannot be told apart.
            raise NotImplementedError(f"a gather index of batch {index.shape[0]} on {batch} samples: only an index "
                                      "of batch 1 (expanded over the batch) replays sample by sample, so gradients "
                                      "of a Jacobian through a per-sample index are not supported")
        return x.gather(int(a["dim"]) + 1, index.expand(batch, *index.shape[1:]))
    if kind == "index_select":
        return x.index_select(int(a["dim"]) + 1, params[0].reshape(-1))
    if kind == "add":
        total = None
        for coefficient, value in zip(map(float, a["coef"].split(",")), inputs):
            term = value if coefficient == 1 else value * coefficient
            total = term if total is None else total + term
        if "offset" in a:
            total = total + float(a["offset"])
        if "offset_param" in a:
            total = total + params[0] * float(a["offset_param"])
        return total
    if kind == "mul":
        return inputs[0] * inputs[1]
    if kind == "div":
        return inputs[0] / inputs[1]
    if kind == "scale":
        factor = float(a["factor"]) if "factor" in a else params[0]
        return x / factor if _flag(a, "divide") else x * factor
    if kind == "matmul":
        factors = list(inputs)
        if "constant" in a:  # a tensor of params without the batch axis, on the stated side
            factors.insert(int(a["constant"]), params[0].transpose(-2, -1) if _flag(a, "transpose") else params[0])
        return torch.matmul(*factors)
    if kind in ("softmax_axis", "log_softmax_axis"):
        return (torch.softmax if kind == "softmax_axis" else torch.log_softmax)(x, int(a["dim"]) + 1)
    if kind == "attention":
        scale = float(a["scale"]) if "scale" in a else None
        mask = params[0] if params else None
        return torch.softmax(attention_scores(x, inputs[1], mask, _flag(a, "causal"), scale), -1) @ inputs[2]
    name, *arguments = kind.split(":")
    if name not in ACTIVATION_REPLAY:
        raise ValueError(f"unknown layer kind {kind!r} in the op's layer encoding")
    return ACTIVATION_REPLAY[name](x, *map(float, arguments))


def attention_scores(q: Tensor, k: Tensor, mask: Optional[Tensor], causal: bool, scale: Optional[float]) -> Tensor:
    """F.scaled_dot_product_attention's scores as its math reference computes them: q k^T * scale (default
    1/sqrt(d)), -inf above the diagonal when causal, then the mask (boolean: where to attend; else added). The
    attention rule (attention_rules.py), its program entry (csrc/graph_kinds.cpp) and the replay all compute this
    form, not the fused kernel, whose CPU version has no forward-mode derivative."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        keep = torch.ones(scores.shape[-2], scores.shape[-1], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores


def replay(x: Tensor, layers: Sequence[str], params: Sequence[Tensor]) -> Tensor:
    """The model the encoding (layers, params) describes, [B, *in] -> [B, *out] (a chain keeps [B, C])."""
    params = list(params)
    if not is_graph_program(layers):  # a chain reads the flattened features
        x = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    slots = [x]
    for layer in layers:
        kind, attributes = parse(layer)
        sources = _ints(attributes["in"]) if "in" in attributes else [len(slots) - 1]
        count = _param_count(kind, attributes)
        taken, params = params[:count], params[count:]
        slots.append(_apply(kind, attributes, [slots[s] for s in sources], taken))
    return slots[-1]


def flat_output(x: Tensor, output: Tensor) -> Tensor:
    """The op's output [B, C] from the replayed [B, *out]."""
    return output.reshape(x.shape[0], math.prod(output.shape[1:]))
