"""Drop-in replacements for Captum's Saliency, InputXGradient, IntegratedGradients and NoiseTunnel, with
Captum's signatures. Each object caches its plans, so repeated calls plan once. Differences from Captum:
target=None means every output ([B, C, *in]) rather than a scalar output, explain.classes(...) asks for
several classes of every sample, and inputs are one tensor (no tuples, no additional_forward_args: wrap
the model, e.g. lambda x: model(x, extra))."""
from typing import Callable, Optional

import torch

from . import gradients as methods
from .rows import JacobianRows
from .targets import CheckedTarget, parse_target


class _Attribution:
    multiplies_by_inputs = False

    def __init__(self, forward_func: Callable):
        self.forward_func = forward_func
        self._rows = JacobianRows(forward_func)

    def has_convergence_delta(self) -> bool:
        return False

    def _spec(self, inputs, target, additional_forward_args=None):
        if isinstance(inputs, tuple):
            raise NotImplementedError("inputs as a tuple of tensors (a model of several inputs) is not supported; "
                                      "pass one tensor and wrap the model, e.g. lambda x: model(x, other)")
        if additional_forward_args is not None:
            raise NotImplementedError("additional_forward_args is not supported; wrap the model instead, e.g. "
                                      "lambda x: model(x, *additional_forward_args)")
        return parse_target(target, inputs.shape[0] if isinstance(inputs, torch.Tensor) else 0,
                            self._rows.num_outputs(inputs))


class Saliency(_Attribution):
    def attribute(self, inputs: torch.Tensor, target=None, abs: bool = True, additional_forward_args=None):
        spec = self._spec(inputs, target, additional_forward_args)
        with torch.no_grad():
            grads = methods.gradients(self._rows, inputs, spec)
            return grads.abs() if abs else grads


class InputXGradient(_Attribution):
    multiplies_by_inputs = True

    def attribute(self, inputs: torch.Tensor, target=None, additional_forward_args=None):
        spec = self._spec(inputs, target, additional_forward_args)
        with torch.no_grad():
            return methods.gradients(self._rows, inputs, spec) * methods.per_sample_factor(inputs, spec)


class IntegratedGradients(_Attribution):
    def __init__(self, forward_func: Callable, multiply_by_inputs: bool = True):
        super().__init__(forward_func)
        self._multiply_by_inputs = multiply_by_inputs

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    def has_convergence_delta(self) -> bool:
        return True

    def attribute(self, inputs: torch.Tensor, baselines=None, target=None, additional_forward_args=None,
                  n_steps: int = 50, method: str = "gausslegendre", internal_batch_size: Optional[int] = None,
                  return_convergence_delta: bool = False):
        spec = self._spec(inputs, target, additional_forward_args)
        with torch.no_grad():
            return methods.integrated_gradients(self._rows, inputs, spec, baselines, n_steps, method,
                                                internal_batch_size, self._multiply_by_inputs,
                                                return_convergence_delta)


class NoiseTunnel:
    """Captum's NoiseTunnel around one of this module's attribution objects (same noise as Captum's for the
    same torch seed and nt_samples_batch_size)."""

    def __init__(self, attribution_method: _Attribution):
        if not isinstance(attribution_method, _Attribution):
            raise TypeError("attribution_method must be an explain.Saliency, InputXGradient or IntegratedGradients, "
                            f"got {type(attribution_method).__name__}")
        self.attribution_method = attribution_method
        self.forward_func = attribution_method.forward_func

    @property
    def multiplies_by_inputs(self) -> bool:
        return self.attribution_method.multiplies_by_inputs

    def has_convergence_delta(self) -> bool:
        return self.attribution_method.has_convergence_delta()

    def attribute(self, inputs: torch.Tensor, nt_type: str = "smoothgrad", nt_samples: int = 5,
                  nt_samples_batch_size: Optional[int] = None, stdevs: float = 1.0,
                  draw_baseline_from_distrib: bool = False, **kwargs):
        if draw_baseline_from_distrib:
            raise NotImplementedError("draw_baseline_from_distrib=True is not supported")
        method = self.attribution_method
        spec = method._spec(inputs, kwargs.get("target"), kwargs.get("additional_forward_args"))
        batch = inputs.shape[0]
        with_delta = bool(kwargs.get("return_convergence_delta")) and method.has_convergence_delta()

        def attribute_copies(noisy, copies):
            expanded = dict(kwargs, target=CheckedTarget(spec.repeat_interleave(copies)))
            baselines = kwargs.get("baselines")
            if isinstance(baselines, torch.Tensor) and baselines.shape[0] == batch > 1:
                expanded["baselines"] = baselines.repeat_interleave(copies, dim=0)
            return method.attribute(noisy, **expanded)

        bytes_per_copy = 3 * methods.rows_width(method._rows, inputs, spec) * inputs[:1].numel() * inputs.element_size()
        if isinstance(method, IntegratedGradients):
            bytes_per_copy *= kwargs.get("n_steps", 50)
        with torch.no_grad():
            return methods.noise_tunnel(attribute_copies, inputs, nt_type, nt_samples, nt_samples_batch_size, stdevs,
                                        bytes_per_copy=bytes_per_copy, return_convergence_delta=with_delta)
