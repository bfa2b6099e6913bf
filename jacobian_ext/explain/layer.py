"""Attributions to a layer's output, with Captum's signatures: LayerGradientXActivation and
LayerIntegratedGradients (e.g. to an nn.Embedding fed integer token ids, whose inputs have no gradient);
`layer` may be a list of layers, and a layer may return a tuple of tensors, as in Captum.

The model is split at the layer by a forward hook: one forward records the layer's output (the activation),
and a forward whose hook replaces the layer's output by given values is a function of those values (with
several layers, every layer's at once: LayerIntegratedGradients interpolates them all together, as Captum
does). LayerGradientXActivation, as Captum's, differentiates instead at the recorded tensors themselves
(the forward going on with copies), so each gets its full gradient through every use; the rows of the targeted outputs with
respect to them come from one backward per targeted row over the whole batch (the samples are
independent, so the gradient of the batch's sum is each sample's own), all targeted rows of every
integration step in one forward. The engine's Jacobian with respect to a layer (batch_jacobian's wrt=) is
not used here: it differentiates at the layer's own output, while integrated gradients need the rows at
replaced values (the integration points), and Captum's forms (lists of layers, layer inputs, tuple outputs,
per-sample arguments) would each need a path of their own.
Integration points, weights and their order are IntegratedGradients' (quadrature.py, step-major)."""
import functools
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .budget import rows_per_call
from .captum_inputs import InvalidArgumentType, format_arguments
from .gradients import per_sample_factor, sum_over_input
from .quadrature import points_and_weights
from .targets import parse_target


class _LayerAttribution:
    def __init__(self, forward_func: Callable, layer, multiply_by_inputs: bool = True):
        if not callable(forward_func):
            raise TypeError(f"forward_func must be an nn.Module or a callable, got {type(forward_func).__name__}")
        layers = layer if isinstance(layer, list) else [layer]
        if not layers or not all(isinstance(m, nn.Module) for m in layers):
            raise TypeError(f"layer must be an nn.Module or a non-empty list of them, got {layer!r}")
        self.forward_func, self.layer = forward_func, layer
        self._layers = layers
        self._multiply_by_inputs = multiply_by_inputs

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    def attribute_future(self, *args, **kwargs):
        raise NotImplementedError(f"attribute_future is not implemented for {type(self).__name__} (nor in Captum)")

    def _run(self, inputs, arguments, replacement: Optional[List[Tuple[torch.Tensor, ...]]] = None,
             to_inputs: bool = False, made_to_require_grad: Optional[list] = None):
        """(model output, [per layer: its output as a tuple of tensors (one for a layer returning a tensor)])
        of forward_func(*inputs, *arguments); with a replacement (a list like it), every layer's output is
        replaced by its values (the model then depends on them). to_inputs: the layers' inputs (their
        positional arguments) instead of their outputs (Captum's attribute_to_layer_input). With a list
        made_to_require_grad, the recorded tensors are made to require grad (those that did not are appended
        to it, for the caller to restore) and the forward goes on with copies of them, so that the model's
        gradient reaches them through every use."""
        recorded = [None] * len(self._layers)

        def hook(index, module, hook_inputs, output=None):
            output = hook_inputs if to_inputs else output
            outputs = output if isinstance(output, tuple) else (output,)
            if not outputs or not all(isinstance(t, torch.Tensor) for t in outputs):
                raise NotImplementedError(f"layer {type(module).__name__} returns a {type(output).__name__}; only a "
                                          "layer returning a tensor or a tuple of tensors is supported")
            if recorded[index] is not None:  # which call's output would be meant, and replaced, is ambiguous
                raise NotImplementedError(f"layer {type(module).__name__} runs more than once in one forward; "
                                          "attributing to a layer called several times is not supported")
            recorded[index] = outputs
            if made_to_require_grad is not None:
                for t in outputs:
                    if not t.requires_grad:
                        if not t.is_floating_point():
                            raise NotImplementedError(f"layer {type(module).__name__}'s tensor of dtype {t.dtype} has "
                                                      "no gradient; attribute to a floating-point one")
                        t.requires_grad_(True)
                        made_to_require_grad.append(t)
                copies = tuple(t.clone() for t in outputs)
                return copies if isinstance(output, tuple) else copies[0]
            if replacement is None:
                return None
            values = replacement[index]
            if [t.shape for t in values] != [t.shape for t in outputs]:
                raise ValueError(f"the layer's output has shapes {[list(t.shape) for t in outputs]}, its replacement "
                                 f"{[list(t.shape) for t in values]}")
            return tuple(values) if isinstance(output, tuple) else values[0]

        register = "register_forward_pre_hook" if to_inputs else "register_forward_hook"
        handles = [getattr(layer, register)(functools.partial(hook, index)) for index, layer in enumerate(self._layers)]
        try:
            output = self.forward_func(*inputs, *(arguments or ()))
        finally:
            for handle in handles:
                handle.remove()
        for layer, outputs in zip(self._layers, recorded):
            if outputs is None:
                raise ValueError(f"layer {type(layer).__name__} did not run in forward_func")
        if not isinstance(output, torch.Tensor) or output.dim() < 1:
            raise ValueError(f"forward_func must return a tensor [B, *out], got "
                             f"{list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__}")
        return output, recorded

    def _rows(self, inputs, arguments, values, spec, grad_kwargs=None, to_inputs=False):
        """Rows of the targeted outputs with respect to the layers' outputs: at `values` (per layer a tuple
        of [B', *layer_k]) replacing them, or, with values None, at the forward's own, differentiated at those
        tensors themselves (through every use, as Captum's LayerGradientXActivation). Per layer alike, each
        [B', *layer_k], or [B', K, *layer_k] for several targets per sample (zeros for a tensor the output
        does not depend on, unless grad_kwargs, torch.autograd.grad's keyword arguments as in Captum, say
        otherwise)."""
        made_to_require_grad = []
        with torch.enable_grad():
            try:
                if values is None:
                    output, values = self._run(inputs, arguments, to_inputs=to_inputs,
                                               made_to_require_grad=made_to_require_grad)
                    flat = [v for layer in values for v in layer]
                else:
                    leaves = [tuple(v.detach().requires_grad_(True) for v in layer) for layer in values]
                    flat = [v for layer in leaves for v in layer]
                    output, _ = self._run(inputs, arguments, leaves, to_inputs)
                picked = spec.select(output.reshape(output.shape[0], output[:1].numel()))
                columns = (picked,) if spec.squeezes_row_axis else picked.unbind(1)
                options = {"allow_unused": True, "materialize_grads": True, **(grad_kwargs or {})}
                grads = [torch.autograd.grad(column.sum(), flat, retain_graph=k + 1 < len(columns), **options)
                         for k, column in enumerate(columns)]
            finally:
                for tensor in made_to_require_grad:  # e.g. the caller's own input tensors
                    tensor.requires_grad_(False)
        rows = grads[0] if spec.squeezes_row_axis else [torch.stack(per_tensor, 1) for per_tensor in zip(*grads)]
        return _like(values, [r.detach() for r in rows]), [tuple(t.detach() for t in layer) for layer in values]

    def _result(self, per_layer):
        """Captum's form: per layer a tuple for a layer returning several tensors, else the tensor; a list
        over the layers when `layer` was a list."""
        results = [layer if len(layer) > 1 else layer[0] for layer in per_layer]
        return results if isinstance(self.layer, list) else results[0]

    def _prepare(self, inputs, target, additional_forward_args, to_inputs):
        given = inputs if isinstance(inputs, tuple) else (inputs,)
        for k, tensor in enumerate(given):
            if not isinstance(tensor, torch.Tensor):
                raise InvalidArgumentType(f"inputs[{k}] must be a torch.Tensor, got {type(tensor).__name__}")
        arguments = format_arguments(additional_forward_args)
        with torch.no_grad():
            output, per_layer = self._run(given, arguments, to_inputs=to_inputs)
        spec = parse_target(target, output.shape[0], tuple(output.shape[1:]), none_means_all=False)
        return given, arguments, spec, output, per_layer


def _like(per_layer, flat):
    """The tensors `flat` regrouped per layer like `per_layer` (a list of tuples)."""
    groups, start = [], 0
    for layer in per_layer:
        groups.append(tuple(flat[start:start + len(layer)]))
        start += len(layer)
    return groups


class LayerGradientXActivation(_LayerAttribution):
    """Captum's LayerGradientXActivation: the gradient of the target with respect to the layer's output,
    times that output (multiply_by_inputs=False: the gradient alone)."""


    def attribute(self, inputs, target=None, additional_forward_args=None, attribute_to_layer_input: bool = False,
                  grad_kwargs=None):
        given, arguments, spec, _, _ = self._prepare(inputs, target, additional_forward_args, attribute_to_layer_input)
        grads, activations = self._rows(given, arguments, None, spec, grad_kwargs, attribute_to_layer_input)
        with torch.no_grad():
            if self._multiply_by_inputs:
                grads = [tuple(g * per_sample_factor(a, spec) for g, a in zip(layer_grads, layer_activations))
                         for layer_grads, layer_activations in zip(grads, activations)]
            return self._result(grads)


class LayerIntegratedGradients(_LayerAttribution):
    """Captum's LayerIntegratedGradients: integrated gradients in the layer's output space, from the layer's
    output at the baselines (inputs' baselines: None, a number, a tensor, or a tuple of those) to its output
    at the inputs."""

    def has_convergence_delta(self) -> bool:
        return True

    def attribute(self, inputs, baselines=None, target=None, additional_forward_args=None, n_steps: int = 50,
                  method: str = "gausslegendre", internal_batch_size: Optional[int] = None,
                  return_convergence_delta: bool = False, attribute_to_layer_input: bool = False,
                  grad_kwargs=None):
        given, arguments, spec, output, per_layer = self._prepare(inputs, target, additional_forward_args,
                                                                  attribute_to_layer_input)
        starts = _input_baselines(baselines, given)
        with torch.no_grad():
            start_output, start_per_layer = self._run(starts, arguments, to_inputs=attribute_to_layer_input)
        activations = [t for layer in per_layer for t in layer]
        start_activations = [t for layer in start_per_layer for t in layer]
        first_tensor = activations[0]
        alphas, weights = (t.to(dtype=first_tensor.dtype, device=first_tensor.device)
                           for t in points_and_weights(method, n_steps))
        batch = first_tensor.shape[0]
        paths = [a - s for a, s in zip(activations, start_activations)]
        # Whole steps per forward: internal_batch_size points (Captum's meaning), else what fits the memory.
        width = 1 if spec.squeezes_row_axis else len(spec.rows) if spec.rows is not None else output[:1].numel()
        bytes_per_row = 3 * width * sum(a[:1].numel() * a.element_size() for a in activations)
        points = rows_per_call(n_steps * batch, batch, bytes_per_row, first_tensor.device, internal_batch_size)
        steps_per_call = max(1, points // max(batch, 1))
        totals = None
        for first in range(0, n_steps, steps_per_call):
            steps = range(first, min(n_steps, first + steps_per_call))
            expand = len(steps)
            values = [torch.cat([start + alphas[s] * path for s in steps])
                      for start, path in zip(start_activations, paths)]
            rows, _ = self._rows(tuple(_repeat(t, expand) for t in given), _repeat_arguments(arguments, expand),
                                 _like(per_layer, values), spec.repeat(expand), grad_kwargs, attribute_to_layer_input)
            with torch.no_grad():
                step_weights = weights[first:first + expand]
                summed = [(r.view(expand, batch, *r.shape[1:]) * step_weights.view(-1, *[1] * r.dim())).sum(0)
                          for layer in rows for r in layer]
                totals = summed if totals is None else [t + s for t, s in zip(totals, summed)]
        with torch.no_grad():
            attributions = ([t * per_sample_factor(p, spec) for t, p in zip(totals, paths)]
                            if self._multiply_by_inputs else totals)
            result = self._result(_like(per_layer, attributions))
            if not return_convergence_delta:
                return result
            sums = sum(sum_over_input(a, 0 if spec.squeezes_row_axis else 1) for a in attributions)
            width = output[:1].numel()
            change = spec.select(output.reshape(batch, width)) - spec.select(start_output.reshape(batch, width))
            return result, sums - change


def _repeat(value, times: int):
    """Captum's expansion of an input or argument over integration steps: tensors with a batch dimension
    repeated step-major (torch.cat of copies), anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and times > 1:
        return torch.cat([value] * times)
    return value


def _repeat_arguments(arguments, times: int):
    return None if arguments is None else tuple(_repeat(a, times) for a in arguments)


def _input_baselines(baselines, inputs):
    """Captum's baselines of the inputs (None: zeros; a number; a tensor [B or 1, *in]; a tuple of those),
    as tensors like the inputs (their dtype: integer token ids have integer baselines)."""
    per_input = baselines if isinstance(baselines, tuple) else (baselines,) * len(inputs)
    if len(per_input) != len(inputs):
        raise ValueError(f"baselines as a tuple needs one entry per input tensor ({len(inputs)}), got {len(per_input)}")
    starts = []
    for k, (baseline, x) in enumerate(zip(per_input, inputs)):
        if baseline is None:
            baseline = 0
        if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
            starts.append(torch.full_like(x, baseline))
            continue
        if not isinstance(baseline, torch.Tensor):
            raise TypeError(f"baselines[{k}] must be None, a number or a tensor, got {type(baseline).__name__}")
        if baseline.shape[1:] != x.shape[1:] or baseline.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"baselines[{k}] must have the shape of its input {list(x.shape)} or [1, *in], got "
                             f"{list(baseline.shape)}")
        starts.append(baseline.expand_as(x).to(x.dtype))
    return tuple(starts)

