"""Attributions for every class in one pass: saliency, input x gradient, integrated gradients and
SmoothGrad from the per-sample Jacobian rows of the targeted classes, as functions and as drop-in
replacements for Captum's classes. `python -m jacobian_ext.explain --demo OUT.png` draws an example."""
from .captum_api import InputXGradient, IntegratedGradients, NoiseTunnel, Saliency
from .functions import input_x_gradient, integrated_gradients, saliency, smoothgrad
from .gradient_shap import GradientShap
from .layer import LayerGradientXActivation, LayerIntegratedGradients
from .quadrature import METHODS, points_and_weights
from .targets import InvalidTarget, InvalidTargetType, all_classes, classes

# The classes that stand in for Captum's of the same name (tests/captum_swap.py runs Captum's tests on them).
CAPTUM_CLASSES = ("Saliency", "InputXGradient", "IntegratedGradients", "NoiseTunnel", "GradientShap",
                  "LayerGradientXActivation", "LayerIntegratedGradients")

__all__ = [
    "saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "classes", "all_classes",
    "InvalidTarget", "InvalidTargetType",
    "Saliency", "InputXGradient", "IntegratedGradients", "NoiseTunnel", "GradientShap",
    "LayerGradientXActivation", "LayerIntegratedGradients", "METHODS", "points_and_weights",
    "CAPTUM_CLASSES",
]
