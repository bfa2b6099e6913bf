"""Choosing a graph node's rule (how its Jacobian block, blocks.py, is pushed forward and pulled back).
Three families:
- native: the C++ ops over features (feature_rules.py, norm_rules.py, functional_layers.py) and attention's
  products, softmax and einsum (attention_rules.py);
- index maps and arithmetic applied to the block directly (index_rules.py, arithmetic_rules.py);
- the torch.func fallback for any other node (fallback.TorchFuncRule): jvp / vjp of that node over the whole
  batch, vmapped over the rows. The planner has checked on a probe that each node maps samples independently,
  so the batch-level jvp / vjp is exactly the per-sample one.
"""
import math
import operator
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import rules as layer_rules
from . import attention_rules, spatial_rules
from .errors import GraphCaptureError
from .blocks import NodeRule
from .arithmetic_rules import (ADD_FUNCTIONS, REDUCTIONS, SUB_FUNCTIONS, is_product, is_sum_or_cat, product_rule,
                               reduction_rule, scale_rule, sum_rule)
from .fallback import TorchFuncRule, call_with_inputs, pick_from_tuple, tuple_origin
from .feature_rules import activation_rule, linear_rule, softmax_rule, spatial_rule
from .functional_layers import functional_layer_rule, functional_pool_rule
from .index_rules import (RESHAPE_FUNCTIONS, RESHAPE_METHODS, ReshapeRule, cat_rule, layout_rule, pad_rule,
                          selection_rule, split_pick_rule)
from .norm_rules import group_norm_rule, layer_norm_rule, rms_norm_rule


def rule_for(gm: fx.GraphModule, node: fx.Node, values: Dict, carries: Dict,
             batch_axes: Dict[fx.Node, int]) -> Tuple[NodeRule, List]:
    """(rule, input nodes that carry a derivative) for a node whose value carries one. `values` are the
    probe's, batch-first; `batch_axes` names the carried values whose own op puts the batch elsewhere."""
    inputs = [a for a in node.all_input_nodes if carries.get(a, False)]
    is_pick = node.op == "call_function" and node.target is operator.getitem
    out_numel = math.prod(values[node].shape[1:])
    picked = split_pick_rule(node, values, carries, batch_axes, out_numel) if is_pick else None
    if picked is not None:
        return picked
    if not is_pick and any(not isinstance(values[i], torch.Tensor) for i in inputs):
        raise GraphCaptureError(f"node '{node.name}' takes a whole multi-output value that carries a derivative")
    if node.target in attention_rules.EINSUMS:
        # Its letters say where each operand's batch axis is, so its rule serves every layout.
        native = attention_rules.einsum_rule(node, values, inputs, batch_axes)
    elif any(n in batch_axes for n in (node, *inputs)):
        # Only index maps (and einsum) know where the batch axis went; any other node is the fallback's, whose function
        # sees its inputs in its own layout (Evaluator.arguments).
        native = (layout_rule(node, values, inputs, batch_axes, out_numel)
                  or _layout_free_rule(gm, node, values, inputs, batch_axes))
    else:
        native = (selection_rule(node, values, inputs, carries, batch_axes, out_numel)
                  or _native_rule(gm, node, values, inputs, out_numel))
    if native is not None:
        return native, inputs
    # getitem on a multi-output node: differentiate the producer as a whole.
    producer, indices = tuple_origin(node, values)
    if indices:
        producer_inputs = [a for a in producer.all_input_nodes if carries.get(a, False)]
        return TorchFuncRule(pick_from_tuple(node, producer, indices, producer_inputs), 4 * out_numel), producer_inputs
    return TorchFuncRule(call_with_inputs(node, inputs), 4 * out_numel), inputs


def _native_rule(gm, node: fx.Node, values, inputs, out_numel) -> Optional[NodeRule]:
    if len(inputs) != 1 and not is_sum_or_cat(node) and not is_product(node) and not _is_attention(node):
        return None
    if node.op == "call_module":
        return _module_rule(gm.get_submodule(node.target), values[inputs[0]], out_numel)
    if node.op in ("call_function", "call_method"):
        x = values[inputs[0]]
        # _function_rule first: it reads F.adaptive_avg_pool2d(x, 1) as the reduction it is (an index map).
        return (functional_layer_rule(gm, node, x, out_numel) or _function_rule(node, values, inputs, out_numel)
                or functional_pool_rule(gm, node, x, out_numel))
    return None


def _is_attention(node: fx.Node) -> bool:
    return node.target in attention_rules.MATMULS or node.target is F.scaled_dot_product_attention


def _module_rule(module: nn.Module, x: torch.Tensor, out_numel: int) -> Optional[NodeRule]:
    input_shape = tuple(x.shape[1:])
    kind = layer_rules.rule_type(module)
    if kind is nn.Linear:
        return linear_rule(module, input_shape)  # on the last axis of N-d inputs too
    if kind in spatial_rules.SPATIAL_RULES:
        return spatial_rule(module, input_shape, out_numel)
    if kind is nn.LayerNorm:
        return layer_norm_rule(module, input_shape, out_numel)
    if kind is nn.GroupNorm:
        return group_norm_rule(module, input_shape, out_numel)
    if kind is getattr(nn, "RMSNorm", None):  # torch >= 2.4
        return rms_norm_rule(module, input_shape, out_numel)
    # The chain layers (activations, softmax, reshapes and eval-mode identities): their one table.
    chain_rule = layer_rules.native_rule(module, input_shape)
    if chain_rule is None and kind in (nn.Softmax, nn.LogSoftmax):  # over an axis of N-d features
        return attention_rules.axis_softmax_rule("log_softmax" if kind is nn.LogSoftmax else "softmax", module.dim, x,
                                                 out_numel)
    if chain_rule is None:
        return None
    if chain_rule.is_reshape:
        return ReshapeRule(0)
    features = math.prod(input_shape)
    if chain_rule.layer in ("softmax", "log_softmax"):
        return softmax_rule(chain_rule.layer == "log_softmax", features)
    return activation_rule(chain_rule.layer, features)


def _function_rule(node: fx.Node, values, inputs, out_numel) -> Optional[NodeRule]:
    target = node.target
    x_node = inputs[0]
    x = values[x_node]
    out = values[node]
    spec = layer_rules.functional_activation_spec(target, node.args, node.kwargs)
    if spec is not None and node.args and node.args[0] is x_node:
        return activation_rule(spec, math.prod(x.shape[1:]))
    softmax = (layer_rules.functional_softmax_layer(target, node.args, node.kwargs, x.shape[1:])
               if node.args and node.args[0] is x_node and isinstance(x, torch.Tensor) else None)
    if softmax is not None:
        return softmax_rule(softmax == "log_softmax", math.prod(x.shape[1:]))
    if node.op == "call_method" and target in RESHAPE_METHODS or target in RESHAPE_FUNCTIONS:
        return ReshapeRule(0) if out.shape[0] == x.shape[0] and node.args[0] is x_node else None
    if node.args and node.args[0] is x_node and layer_rules.functional_identity_in_eval(target, node.args, node.kwargs):
        return ReshapeRule(0)
    layout = layout_rule(node, values, inputs, {}, out_numel)
    if layout is not None:
        return layout
    if target in ADD_FUNCTIONS or target in SUB_FUNCTIONS or target in (operator.neg, torch.neg, "neg"):
        return sum_rule(node, values, inputs, out_numel)
    if is_product(node):
        carried = [a for a in node.args if isinstance(a, fx.Node) and a in inputs]
        if len(carried) == 2:  # both factors carry a derivative (x * x included)
            return product_rule(node, values, out_numel)
        return scale_rule(node, values, x_node, out_numel)
    if target in (torch.cat, torch.concat):
        return cat_rule(node, values, inputs, out_numel)
    if target is F.pad and node.args and node.args[0] is x_node:
        return pad_rule(node, values, out_numel)
    if target is F.normalize and node.args and node.args[0] is x_node:
        return attention_rules.normalize_rule(node, x, out_numel)
    if target in attention_rules.MATMULS:
        return attention_rules.matmul_rule(node, values, inputs)
    if target is F.scaled_dot_product_attention:
        return attention_rules.attention_rule(node, values, inputs)
    axis_softmax = layer_rules.softmax_call(target, node.args, node.kwargs)
    if axis_softmax is not None and node.args[0] is x_node:
        return attention_rules.axis_softmax_rule(*axis_softmax, x, out_numel)
    if target in REDUCTIONS and node.args and node.args[0] is x_node:
        return reduction_rule(node, x, out_numel)
    return None


def _layout_free_rule(gm, node: fx.Node, values, inputs, batch_axes: Dict[fx.Node, int]) -> Optional[NodeRule]:
    """Nodes whose rule does not care where the batch axis is, as long as it stays put: activations (elementwise)
    and a Linear over the last axis when the batch is not that axis (a time-major RNN's projections)."""
    if len(inputs) != 1 or not node.args or node.args[0] is not inputs[0]:
        return None
    x = values[inputs[0]]
    x_axis = batch_axes.get(inputs[0], 0)
    if batch_axes.get(node, 0) != x_axis:
        return None
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    if module is not None and layer_rules.rule_type(module) is nn.Linear:
        return None if x_axis == x.dim() - 1 else linear_rule(module, tuple(x.shape[1:]))
    if values[node].shape != x.shape:
        return None
    features = math.prod(x.shape[1:])
    if module is not None:
        chain_rule = layer_rules.native_rule(module, tuple(x.shape[1:]))
        if chain_rule is None or chain_rule.layer in ("softmax", "log_softmax"):
            return None
        return ReshapeRule(0) if chain_rule.is_reshape else activation_rule(chain_rule.layer, features)
    spec = layer_rules.functional_activation_spec(node.target, node.args, node.kwargs)
    return None if spec is None else activation_rule(spec, features)
