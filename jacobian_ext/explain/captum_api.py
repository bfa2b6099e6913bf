"""Drop-in replacements for Captum's Saliency, InputXGradient, IntegratedGradients and NoiseTunnel
(GradientShap: gradient_shap.py), with Captum's signatures and argument forms (captum_inputs.py: a tensor
or a tuple of tensors, per-input baselines, additional_forward_args, N-d outputs; targets.py: every target
form). Each object caches its plans, so repeated calls plan once. target=None means what it means in
Captum, the model's one output per sample; target=explain.all_classes (or explain.classes(...))
attributes several outputs in one pass."""
from typing import Callable, Optional

import torch

from . import gradients as methods
from .captum_inputs import EngineCache, InvalidArgument, as_captum_result
from .targets import parse_target


class _Attribution:
    multiplies_by_inputs = False

    def __init__(self, forward_func: Callable):
        self.forward_func = forward_func
        self._engines = EngineCache(forward_func)

    def has_convergence_delta(self) -> bool:
        return False

    def attribute_future(self, *args, **kwargs):
        raise NotImplementedError(f"attribute_future is not implemented for {type(self).__name__} (nor in Captum)")

    def compute_convergence_delta(self, attributions, start_point, end_point, target=None,
                                  additional_forward_args=None) -> torch.Tensor:
        """Captum's delta of given attributions (any gradient method's, as Captum's GradientAttribution): their
        sum per sample (and class, for several targets) minus f(end_point) - f(start_point); start_point takes
        every form of baselines."""
        call = self._engines.call(end_point, additional_forward_args, name="end_point")
        spec = parse_target(target, call.batch, call.output_shape, none_means_all=False)
        pieces = attributions if isinstance(attributions, tuple) else (attributions,)
        if len(pieces) != len(call.inputs) or not all(isinstance(p, torch.Tensor) for p in pieces):
            raise InvalidArgument(f"attributions must be a tensor per end_point tensor ({len(call.inputs)}), got "
                                  f"{len(pieces)} of types {[type(p).__name__ for p in pieces]}")
        for k, piece in enumerate(pieces):
            if piece.shape[0] != call.batch:
                raise InvalidArgument(f"attributions[{k}] has {piece.shape[0]} samples, its end_point {call.batch}")
        with torch.no_grad():
            row_axes = 0 if spec.squeezes_row_axis else 1
            sums = sum(methods.sum_over_input(p.reshape(call.batch, *((-1,) if row_axes else ()), *t.shape[1:]),
                                              row_axes) for p, t in zip(pieces, call.inputs))
            return methods.convergence_delta(call.rows, sums, call.x, call.baseline(start_point, "start_point"), spec)

    def _prepare(self, inputs, target, additional_forward_args):
        """(the call on its engine, the checked target)."""
        call = self._engines.call(inputs, additional_forward_args)
        return call, parse_target(target, call.batch, call.output_shape, none_means_all=False)

    def _on_engine(self, call, x, spec, copies: int, **options):
        """The attributions (and deltas) of engine inputs x: the call's own, or `copies` noisy copies of each
        sample (a NoiseTunnel's), in the engine's layout."""
        raise NotImplementedError

    def _attribute(self, inputs, target, additional_forward_args, **options):
        call, spec = self._prepare(inputs, target, additional_forward_args)
        with torch.no_grad():
            return finish(call, spec, self._on_engine(call, call.x, spec, 1, **options))


def finish(call, spec, result):
    """Engine results (attributions, or (attributions, deltas)) in Captum's form: per input, the tensor or
    tuple the inputs came as; every-class results as [B, *out, *in]."""
    attributions, delta = result if isinstance(result, tuple) else (result, None)
    pieces = call.unpack(attributions, 0 if spec.squeezes_row_axis else 1)
    if spec.kind == "all" and len(call.output_shape) != 1:
        pieces = [p.reshape(p.shape[0], *call.output_shape, *p.shape[2:]) for p in pieces]
    formatted = as_captum_result(pieces, call.given_as_tuple)
    return formatted if delta is None else (formatted, delta)


def delta_on_engine(call, spec, attributions, end, start):
    """Captum's completeness gap of engine-layout attributions: their sum over the attributed inputs (not
    the per-sample arguments riding in the engine's input) minus f(end) - f(start)."""
    row_axes = 0 if spec.squeezes_row_axis else 1
    sums = sum(methods.sum_over_input(p, row_axes) for p in call.unpack(attributions, row_axes))
    return methods.convergence_delta(call.rows, sums, end, start, spec)


class Saliency(_Attribution):
    def attribute(self, inputs, target=None, abs: bool = True, additional_forward_args=None):
        return self._attribute(inputs, target, additional_forward_args, abs=abs)

    def _on_engine(self, call, x, spec, copies, abs=True):
        grads = methods.gradients(call.rows, x, spec)
        return grads.abs() if abs else grads


class InputXGradient(_Attribution):
    multiplies_by_inputs = True

    def attribute(self, inputs, target=None, additional_forward_args=None):
        return self._attribute(inputs, target, additional_forward_args)

    def _on_engine(self, call, x, spec, copies):
        return methods.gradients(call.rows, x, spec) * methods.per_sample_factor(x, spec)


class PathAttribution(_Attribution):
    """The gradient-along-a-path methods (IntegratedGradients, GradientShap): multiplying by the inputs is the
    caller's choice, and their attributions have a convergence delta."""

    def __init__(self, forward_func: Callable, multiply_by_inputs: bool = True):
        super().__init__(forward_func)
        self._multiply_by_inputs = multiply_by_inputs

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    def has_convergence_delta(self) -> bool:
        return True


class IntegratedGradients(PathAttribution):

    def attribute(self, inputs, baselines=None, target=None, additional_forward_args=None, n_steps: int = 50,
                  method: str = "gausslegendre", internal_batch_size: Optional[int] = None,
                  return_convergence_delta: bool = False):
        return self._attribute(inputs, target, additional_forward_args, baselines=baselines, n_steps=n_steps,
                               method=method, internal_batch_size=internal_batch_size,
                               return_convergence_delta=return_convergence_delta)

    def _on_engine(self, call, x, spec, copies, baselines=None, n_steps=50, method="gausslegendre",
                   internal_batch_size=None, return_convergence_delta=False):
        baseline = call.baseline(baselines)
        if copies > 1 and baseline.shape[0] == call.batch > 1:  # Captum expands per-sample baselines alike
            baseline = baseline.repeat_interleave(copies, dim=0)
        attributions = methods.integrated_gradients(call.rows, x, spec, baseline, n_steps, method, internal_batch_size,
                                                    self._multiply_by_inputs)
        if not return_convergence_delta:
            return attributions
        return attributions, delta_on_engine(call, spec, attributions, x, baseline)


_NOISE_TUNNEL_METHODS = (Saliency, InputXGradient, IntegratedGradients)


class NoiseTunnel:
    """Captum's NoiseTunnel around one of this module's attribution objects (same noise as Captum's for the
    same torch seed and nt_samples_batch_size: per partition of copies, one draw per input tensor in order)."""

    def __init__(self, attribution_method: _Attribution):
        if isinstance(attribution_method, _Attribution) and not isinstance(attribution_method, _NOISE_TUNNEL_METHODS):
            raise NotImplementedError(f"NoiseTunnel around {type(attribution_method).__name__} is not supported")
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

    def attribute_future(self, *args, **kwargs):
        raise NotImplementedError("attribute_future is not implemented for NoiseTunnel (nor in Captum)")

    def attribute(self, inputs, nt_type: str = "smoothgrad", nt_samples: int = 5,
                  nt_samples_batch_size: Optional[int] = None, stdevs=1.0,
                  draw_baseline_from_distrib: bool = False, **kwargs):
        if draw_baseline_from_distrib:
            raise NotImplementedError("draw_baseline_from_distrib=True is not supported")
        method = self.attribution_method
        call, spec = method._prepare(inputs, kwargs.pop("target", None), kwargs.pop("additional_forward_args", None))
        per_input_stdevs = methods.stdevs_per_input(stdevs, len(call.inputs))
        with_delta = bool(kwargs.get("return_convergence_delta")) and method.has_convergence_delta()
        if not method.has_convergence_delta():
            kwargs.pop("return_convergence_delta", None)

        def attribute_copies(copies):
            noisy = [methods.add_noise(x, copies, stdev) for x, stdev in zip(call.inputs, per_input_stdevs)]
            return method._on_engine(call, call.pack(noisy), spec.repeat_interleave(copies), copies, **kwargs)

        bytes_per_copy = 3 * methods.rows_width(call.rows, call.x, spec) * call.x[:1].numel() * call.x.element_size()
        if isinstance(method, IntegratedGradients):
            bytes_per_copy *= kwargs.get("n_steps", 50)
        with torch.no_grad():
            result = methods.noise_tunnel(attribute_copies, call.batch, call.x.device, nt_type, nt_samples,
                                          nt_samples_batch_size, bytes_per_copy, return_convergence_delta=with_delta)
            return finish(call, spec, result)
