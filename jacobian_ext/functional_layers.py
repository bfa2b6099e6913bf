"""Layers called functionally (F.linear, F.batch_norm in eval mode, F.layer_norm, F.rms_norm, the functional
pools) read as the rule of the module they stand for. Their tensors are get_attr nodes of the captured graph,
read through the captured model at every call (attribute_source), so replaced parameters are never stale."""
from typing import Callable, Dict, Optional, Sequence

import torch.nn.functional as F
from torch import fx, nn

from . import spatial_rules
from .blocks import NodeRule
from .rules import read_path, tensor_getter
from .feature_rules import NdOpRule, linear_rule, spatial_rule
from .norm_rules import layer_norm_rule, rms_norm_rule


def attribute_source(gm: fx.GraphModule) -> nn.Module:
    """The module that get_attr targets are read from: the captured model (capture() records it), not gm.
    fx.GraphModule keeps references of its own to the tensors that get_attr nodes read, and those go stale
    when the model's parameter is replaced (m.weight = nn.Parameter(...), load_state_dict(assign=True))."""
    return gm.meta.get(CAPTURED_MODEL, gm)


CAPTURED_MODEL = "jacobian_ext_captured_model"


class _GraphTensors:
    """The tensors a functional call reads from the model (get_attr nodes of the captured graph: a traced
    subclass's self.weight, self.running_var) as attributes looked up at every access, beside constant
    attributes (eps, normalized_shape): a stand-in for the module, so that the module rules' ops and
    encodings read current parameters from it at every call. Each tensor's owning module is found once:
    replacing a module changes the model's layout, which replans (api.JacobianModule._forget_stale_plans)."""

    def __init__(self, gm: fx.GraphModule, targets: Dict[str, Optional[str]], **constants):
        source = attribute_source(gm)
        self._readers = {}
        for name, target in targets.items():
            if target is not None:
                path, _, leaf = target.rpartition(".")
                self._readers[name] = tensor_getter(read_path(source, path), leaf)
        self._absent = {name for name, target in targets.items() if target is None}
        self.__dict__.update(constants)

    def __getattr__(self, name):
        read = self.__dict__.get("_readers", {}).get(name)
        if read is None:
            if name in self.__dict__.get("_absent", ()):
                return None
            raise AttributeError(name)
        return read()

    def tensor_getter(self, name: str) -> Callable:
        """A getter of the tensor `name` that reads its owning module directly (rules.tensor_getter)."""
        return (lambda: None) if name in self._absent else self._readers[name]


def _get_attr_targets(arguments: Dict, names: Sequence[str]) -> Optional[Dict[str, Optional[str]]]:
    """The get_attr targets of the tensor arguments `names` (None for an absent one), or None when one
    is computed in the graph (not a parameter or buffer of the model)."""
    targets = {}
    for name in names:
        value = arguments.get(name)
        if value is None:
            targets[name] = None
        elif isinstance(value, fx.Node) and value.op == "get_attr":
            targets[name] = value.target
        else:
            return None
    return targets


# Functional pools, as the module each stands for (built from the call's arguments, which are constants of
# the captured graph): (module type, its constructor's argument names in the function's order after input).
_FUNCTIONAL_POOLS = {
    F.max_pool2d: (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    F.max_pool1d: (nn.MaxPool1d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    F.avg_pool2d: (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                  "divisor_override")),
    F.avg_pool1d: (nn.AvgPool1d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, ("output_size",)),
    F.adaptive_avg_pool1d: (nn.AdaptiveAvgPool1d, ("output_size",)),
}


def functional_pool_rule(gm: fx.GraphModule, node: fx.Node, x, out_numel: int) -> Optional[NodeRule]:
    """F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d (and the 1-d forms) with constant arguments: the
    rule of the pooling module with those arguments (inception's branches call them functionally)."""
    if node.op != "call_function" or node.target not in _FUNCTIONAL_POOLS:
        return None
    module_type, names = _FUNCTIONAL_POOLS[node.target]
    normalized = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    if normalized is None or not isinstance(normalized.kwargs.get("input"), fx.Node):
        return None
    arguments = {name: value for name, value in normalized.kwargs.items() if name in names}
    traced = []
    fx.node.map_arg(list(arguments.values()), traced.append)
    if traced:  # an argument computed in the graph
        return None
    if arguments.get("stride") in (None, []) and "stride" in names:
        arguments.pop("stride", None)  # the functions' default stride is the kernel size, as the modules'
    try:
        module = module_type(**arguments)
    except (TypeError, ValueError):
        return None
    return spatial_rule(module, tuple(x.shape[1:]), out_numel)


_RMS_NORM = getattr(F, "rms_norm", None)  # torch >= 2.4


def functional_layer_rule(gm: fx.GraphModule, node: fx.Node, x, out_numel: int) -> Optional[NodeRule]:
    """F.linear, F.batch_norm in eval mode (training=False), F.layer_norm and F.rms_norm on the node's carried
    input, with the model's own parameters and buffers: the module rules of Linear, BatchNorm, LayerNorm and
    RMSNorm (a subclass whose
    forward calls them functionally, e.g. timm's BatchNormAct2d, convnext's LayerNorm2d and timm's classifier
    Linear, is traced into)."""
    if node.op != "call_function" or node.target not in (F.linear, F.batch_norm, F.layer_norm, _RMS_NORM):
        return None
    normalized = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    if normalized is None or not isinstance(normalized.kwargs.get("input"), fx.Node):
        return None
    arguments = normalized.kwargs
    input_shape = tuple(x.shape[1:])
    if node.target is F.linear:
        targets = _get_attr_targets(arguments, ("weight", "bias"))
        if targets is None or targets["weight"] is None:
            return None
        tensors = _GraphTensors(gm, targets)
        if tensors.weight.dim() != 2 or not input_shape or input_shape[-1] != tensors.weight.shape[1]:
            return None
        out_features, in_features = tensors.weight.shape
        return linear_rule(_GraphTensors(gm, targets, in_features=in_features, out_features=out_features),
                            input_shape)
    # F.rms_norm's eps None means the dtype's epsilon (_RMSNormCall), the others' default is 1e-5.
    eps = arguments.get("eps", None if node.target is _RMS_NORM else 1e-5)
    if not (isinstance(eps, (int, float)) or eps is None and node.target is _RMS_NORM):
        return None
    if node.target in (F.layer_norm, _RMS_NORM):
        shape = arguments.get("normalized_shape")
        targets = _get_attr_targets(arguments, ("weight", "bias") if node.target is F.layer_norm else ("weight",))
        if targets is None or not isinstance(shape, (tuple, list)) or not all(isinstance(n, int) for n in shape):
            return None
        tensors = _GraphTensors(gm, targets, normalized_shape=tuple(shape), eps=None if eps is None else float(eps))
        return (layer_norm_rule if node.target is F.layer_norm else rms_norm_rule)(tensors, input_shape, out_numel)
    targets = _get_attr_targets(arguments, ("weight", "bias", "running_mean", "running_var"))
    if (arguments.get("training", False) is not False or targets is None or targets["running_mean"] is None
            or targets["running_var"] is None or len(input_shape) not in (1, 2, 3)):
        return None
    tensors = _GraphTensors(gm, targets, eps=float(eps))
    if tensors.running_mean.shape != (input_shape[0],):
        return None

    def call_of(module, shape):
        return spatial_rules.SpatialCall("batch_norm", dict(
            weight=module.weight, bias=module.bias, running_mean=module.running_mean,
            running_var=module.running_var, eps=module.eps))

    return NdOpRule(tensors, input_shape, call_of, "batch_norm", out_numel)
