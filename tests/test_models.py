"""Real architectures with random weights (nothing downloaded), captured as graphs, against
torch.func.vmap(jacrev) in float64: relative error at most 1e-9."""
import pytest
import torch
from torch import nn

import jacobian_ext as jx
from conftest import reference_jacobian

torchvision = pytest.importorskip("torchvision")

RELATIVE_ERROR = 1e-9


def vit_small():
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10
    )
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head: J would be 0
    return model


def convnext_small_maps():
    """ConvNeXt's blocks on maps of 8, 4, 2 and 1 positions (32 x 32 images): patch-stride stem and downsampling,
    7 x 7 depthwise kernels wider than the 2 x 2 and 1 x 1 maps, layer norms through permutes, layer scale."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    settings = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, 24, 1), CNBlockConfig(24, 32, 1), CNBlockConfig(32, None, 1)]
    model = ConvNeXt(settings, layer_scale=0.5, num_classes=10)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):  # away from the identity they start as
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    return model


def cnn_classifier():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, stride=2, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(),
        nn.Linear(64, 10), nn.Softmax(dim=-1),
    )


MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "vit_small": vit_small,
    "convnext_small_maps": convnext_small_maps,
    "cnn_classifier": cnn_classifier,
}


def randomise_batch_norm_statistics(model):
    # Fresh BatchNorm layers have mean 0 and variance 1, which would hide a wrong scale.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("name", list(MODELS))
def test_model_matches_torch_func(name):
    model = MODELS[name]().double().eval()
    randomise_batch_norm_statistics(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    jm = jx.compile(model)
    y, jacobian = jm(x)
    expected = reference_jacobian(model, x)
    assert expected.abs().max() > 0
    assert jacobian.shape == (2, 10, 3, 32, 32)
    assert relative_error(y, model(x)) <= RELATIVE_ERROR
    assert relative_error(jacobian, expected) <= RELATIVE_ERROR, repr(jm)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_cnn_classifier_both_modes_small_input(mode):
    model = cnn_classifier().double().eval()
    randomise_batch_norm_statistics(model)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    jacobian = jx.batch_jacobian(model, x, mode=mode)
    assert relative_error(jacobian, reference_jacobian(model, x)) <= RELATIVE_ERROR
