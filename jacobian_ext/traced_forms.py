"""torch's composite layers, written for the tracer with ops the graph rules know (matmul, softmax over an
axis, scaled dot-product attention, index maps), so that they become native nodes instead of one opaque
fallback node. Each form computes exactly what the module computes in eval mode for the arguments it
accepts; `form_for` returns None for any other call (a mask, training mode, separate key/value widths),
and the module then stays a leaf on the fallback. Their forwards cannot be traced as they are: they branch
on properties of the input tensors (the fast paths, unbatched inputs)."""
from typing import Callable, Optional

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


_FORMS = {
    nn.MultiheadAttention: _multihead_attention_form,
    nn.TransformerEncoderLayer: _encoder_layer_form,
    nn.TransformerEncoder: _encoder_form,
}


def form_for(module: nn.Module, args, kwargs) -> Optional[Callable[[], object]]:
    """A call computing module(*args, **kwargs) in traceable ops, or None. Exact types only (a subclass may
    override forward); eval mode only (training mode has dropout, which couples nothing but randomises)."""
    form = _FORMS.get(type(module))
    if form is None or module.training:
        return None
    try:
        return form(module, *args, **kwargs)
    except TypeError:  # arguments this torch release's forward does not take
        return None
