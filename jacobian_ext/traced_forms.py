"""torch's composite layers and torchvision's Swin Transformer layers, written for the tracer with ops the
graph rules know (matmul, softmax over an axis, scaled dot-product attention, index maps), so that they
become native nodes instead of one opaque fallback node. Each form computes exactly what the module computes
in eval mode for the arguments it accepts; `form_for` returns None for any other call (a mask, training mode,
separate key/value widths), and the module then stays a leaf on the fallback. Their forwards cannot be traced
as they are: they branch on properties of the input tensors (the fast paths, unbatched inputs, a window
larger than the map) or merge the batch axis with another (Swin's windows)."""
import functools
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _projected(x, weight, bias):
    y = torch.matmul(x, weight.t())
    return y if bias is None else y + bias


def _heads(x, heads: int):
    """[B, L, E] -> [B, heads, L, E / heads]."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(1, 2)


def _multihead_attention(module: nn.MultiheadAttention, query, key, value, need_weights: bool,
                         average_attn_weights: bool):
    if not module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    width, heads = module.embed_dim, module.num_heads
    weight, bias = module.in_proj_weight, module.in_proj_bias
    if query is key and key is value:  # self-attention: one projection, split in three
        q, k, v = _projected(query, weight, bias).chunk(3, dim=-1)
    else:
        parts = [(weight[i * width:(i + 1) * width], None if bias is None else bias[i * width:(i + 1) * width])
                 for i in range(3)]
        q, k, v = (_projected(t, w, b) for t, (w, b) in zip((query, key, value), parts))
    q, k, v = (_heads(t, heads) for t in (q, k, v))
    weights = None
    if need_weights:
        probabilities = (torch.matmul(q, k.transpose(-2, -1)) * (width // heads) ** -0.5).softmax(dim=-1)
        out = torch.matmul(probabilities, v)
        weights = probabilities.mean(dim=1) if average_attn_weights else probabilities
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    # out_proj is a Linear subclass of torch's own (NonDynamicallyQuantizableLinear), read as its parameters
    out = _projected(out.transpose(1, 2).flatten(2), module.out_proj.weight, module.out_proj.bias)
    return (out if module.batch_first else out.transpose(0, 1)), weights


def _multihead_attention_form(module: nn.MultiheadAttention, query, key, value, key_padding_mask=None,
                              need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
    if (key_padding_mask is not None or attn_mask is not None or is_causal or not module._qkv_same_embed_dim
            or module.bias_k is not None or module.bias_v is not None or module.add_zero_attn
            or not isinstance(need_weights, bool) or not isinstance(average_attn_weights, bool)):
        return None
    return lambda: _multihead_attention(module, query, key, value, need_weights, average_attn_weights)


def _encoder_layer(module: nn.TransformerEncoderLayer, x):
    attend = lambda t: module._sa_block(t, None, None, False)  # noqa: E731
    if module.norm_first:
        x = x + attend(module.norm1(x))
        return x + module._ff_block(module.norm2(x))
    x = module.norm1(x + attend(x))
    return module.norm2(x + module._ff_block(x))


def _encoder_layer_form(module: nn.TransformerEncoderLayer, src, src_mask=None, src_key_padding_mask=None,
                        is_causal=False):
    if src_mask is not None or src_key_padding_mask is not None or is_causal:
        return None
    return lambda: _encoder_layer(module, src)


def _encoder(module: nn.TransformerEncoder, x):
    for layer in module.layers:
        x = layer(x)
    return x if module.norm is None else module.norm(x)


def _encoder_form(module: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None, is_causal=None):
    if mask is not None or src_key_padding_mask is not None or is_causal:
        return None
    return lambda: _encoder(module, src)


# ---- torchvision's Swin Transformer: windows [B, windows, N, C] and heads [B, windows, heads, N, d], the batch
# axis never merged with another. Input sizes are not known when the model is captured (once, for every size),
# so the padding, the shift and the mask come from traced shape queries and the helpers below, which fx records
# as calls on shape integers: constants of the derivative, recomputed at every call.

@torch.fx.wrap
def _window_shift(shift: int, window: int, padded: int) -> int:
    """The cyclic shift along an axis that torchvision applies: none where one window covers the padded map."""
    return shift if window < padded else 0


@torch.fx.wrap
def _shifted_window_mask(height: int, width: int, window: Sequence[int], shift_h: int, shift_w: int,
                         dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive mask of shifted-window attention, [windows, 1, N, N]: -100 between two tokens of a window
    that the cyclic shift brought from different regions of the padded map, else 0. Along a shifted axis of
    size n the regions are [0, n - window), [n - window, n - shift) and [n - shift, n) (the last window's part
    that stays, and the part rolled in from the start); an axis without a shift is one region."""
    def regions(size: int, size_window: int, shift: int) -> torch.Tensor:
        position = torch.arange(size, device=device)
        if shift == 0:
            return torch.zeros_like(position)
        return (position >= size - size_window).long() + (position >= size - shift).long()

    labels = regions(height, window[0], shift_h)[:, None] * 3 + regions(width, window[1], shift_w)[None, :]
    labels = _windows(labels[None, :, :, None], window).squeeze(-1).squeeze(0)  # [windows, N]
    apart = labels[:, :, None] != labels[:, None, :]
    return torch.zeros(apart.shape, dtype=dtype, device=device).masked_fill(apart, -100.0).unsqueeze(1)


def _windows(x, window: Sequence[int]):
    """[B, H, W, C] -> [B, H / wh * W / ww, wh * ww, C]: the windows in row-major order, tokens likewise."""
    x = x.unflatten(1, (-1, window[0])).unflatten(3, (-1, window[1]))  # [B, H / wh, wh, W / ww, ww, C]
    return x.transpose(2, 3).flatten(3, 4).flatten(1, 2)


def _unwindowed(x, window: Sequence[int], rows: int):
    """_windows' inverse, for a map of `rows` windows down."""
    x = x.unflatten(1, (rows, -1)).unflatten(3, tuple(window))  # [B, H / wh, W / ww, wh, ww, C]
    return x.transpose(2, 3).flatten(3, 4).flatten(1, 2)


def _qkv_bias(module: nn.Module, cosine: bool):
    """The bias of the qkv projection; torchvision zeroes its keys' third for cosine attention at every call."""
    bias = module.qkv.bias
    if bias is None or not cosine:
        return bias
    query, key, value = bias.chunk(3)
    return torch.cat([query, torch.zeros_like(key), value])


def _shifted_window_attention(module: nn.Module, x, cosine: bool):
    """ShiftedWindowAttention (cosine=False) and ShiftedWindowAttentionV2 on x [B, H, W, C]: the map padded
    to whole windows at its bottom and right, rolled by the shift, attention within each window (relative
    position bias, and the mask keeping apart what the roll brought together), rolled back and cropped.

    torchvision projects the padded map: its qkv and output projections run on every padded token, up to 49
    per real one where a 7 x 7 window covers a 1 x 1 map (Swin's last stage on a 32 x 32 image). Both are the
    same map of each token, so they commute with the padding, the roll, the windows and the crop: the qkv
    projection runs on the real tokens before the padding (a zero token projects to zero; the bias is added
    after it, where the padded tokens get it as torchvision's do), the output projection after the crop.
    Same values, and the projections' Jacobian products shrink by the padding's factor."""
    window, heads = module.window_size, module.num_heads
    height, width = x.shape[1], x.shape[2]
    x = _projected(x, module.qkv.weight, None)  # [B, H, W, 3C]
    x = F.pad(x, (0, 0, 0, (-width) % window[1], 0, (-height) % window[0]))
    padded_h, padded_w = x.shape[1], x.shape[2]
    # A block configured without a shift (every other one) has no roll and no mask at any input size.
    shifts = [_window_shift(shift, size, padded) for shift, size, padded in
              zip(module.shift_size, window, (padded_h, padded_w))] if any(module.shift_size) else None
    if shifts is not None:
        x = torch.roll(x, [-shift for shift in shifts], (1, 2))
    qkv = _windows(x, window)
    bias = _qkv_bias(module, cosine)
    if bias is not None:
        qkv = qkv + bias
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(0, 1, 3, 4, 2, 5).unbind(2)  # [B, windows, heads, N, d]
    if cosine:
        attention = torch.matmul(F.normalize(q, dim=-1), F.normalize(k, dim=-1).transpose(-2, -1))
        attention = attention * torch.clamp(module.logit_scale, max=math.log(100.0)).exp()
    else:
        attention = torch.matmul(q * (module.qkv.in_features // heads) ** -0.5, k.transpose(-2, -1))
    attention = attention + module.get_relative_position_bias()
    if shifts is not None:
        attention = attention + _shifted_window_mask(padded_h, padded_w, window, *shifts, x.dtype, x.device)
    out = torch.matmul(F.softmax(attention, dim=-1), v).transpose(2, 3).flatten(-2)  # [B, windows, N, C]
    x = _unwindowed(out, window, padded_h // window[0])
    if shifts is not None:
        x = torch.roll(x, shifts, (1, 2))
    return module.proj(x[:, :height, :width])


def _shifted_window_attention_form(module: nn.Module, x, cosine: bool):
    if not all(0 <= shift < size for shift, size in zip(module.shift_size, module.window_size)):
        return None  # torchvision's mask slices overlap there, which _shifted_window_mask does not reproduce
    return lambda: _shifted_window_attention(module, x, cosine)


def _patch_merging(module: nn.Module, x, norm_first: bool):
    """PatchMerging (norm_first) and PatchMergingV2 on x [..., H, W, C]: an odd side padded with a zero row or
    column, each 2 x 2 patch's tokens concatenated (top-left, bottom-left, top-right, bottom-right) into
    [..., H / 2, W / 2, 4C], then the norm and the reduction in the version's order."""
    height, width = x.shape[-3], x.shape[-2]
    x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
    x = x.unflatten(-3, (-1, 2)).unflatten(-2, (-1, 2))  # [..., H / 2, row, W / 2, column, C]
    x = x.movedim(-4, -2).flatten(-3)  # [..., H / 2, W / 2, column, row, C] -> [..., H / 2, W / 2, 4C]
    return module.reduction(module.norm(x)) if norm_first else module.norm(module.reduction(x))


_FORMS = {
    nn.MultiheadAttention: _multihead_attention_form,
    nn.TransformerEncoderLayer: _encoder_layer_form,
    nn.TransformerEncoder: _encoder_form,
}
# torchvision is not a dependency: its layers are matched by qualified class name.
_FORMS_BY_NAME = {
    "torchvision.models.swin_transformer.ShiftedWindowAttention":
        functools.partial(_shifted_window_attention_form, cosine=False),
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2":
        functools.partial(_shifted_window_attention_form, cosine=True),
    "torchvision.models.swin_transformer.PatchMerging":
        lambda module, x: lambda: _patch_merging(module, x, norm_first=True),
    "torchvision.models.swin_transformer.PatchMergingV2":
        lambda module, x: lambda: _patch_merging(module, x, norm_first=False),
}


def form_for(module: nn.Module, args, kwargs) -> Optional[Callable[[], object]]:
    """A call computing module(*args, **kwargs) in traceable ops, or None. Exact types only (a subclass may
    override forward); eval mode only (training mode has dropout, which couples nothing but randomises)."""
    cls = type(module)
    form = _FORMS.get(cls) or _FORMS_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
    if form is None or module.training:
        return None
    try:
        return form(module, *args, **kwargs)
    except TypeError:  # arguments this torch release's forward does not take
        return None
