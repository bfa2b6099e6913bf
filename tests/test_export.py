"""The whole-plan operator is callable where torch.func is not: TorchScript and torch.export (the
full deployment story, torch.compile and C++, is a later issue)."""
from typing import List, Tuple

import torch
from torch import nn

import jacobian_ext  # noqa: F401  (loads torch.ops.jacext)
from conftest import assert_matches_reference, reference_jacobian


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), nn.LogSoftmax(-1)).double().eval()


class NativeJacobian(nn.Module):
    """Calls the registered op directly, as production code would."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        params = [self.model[0].weight, self.model[0].bias, self.model[2].weight, self.model[2].bias]
        return torch.ops.jacext.batch_jacobian(x, ["linear", "relu", "linear", "log_softmax"], params, "reverse")


def test_torchscript_calls_the_op():
    @torch.jit.script
    def jacobian(x: torch.Tensor, layers: List[str], params: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.jacext.batch_jacobian(x, layers, params, "forward")

    model = mlp()
    x = torch.randn(5, 6, dtype=torch.float64)
    params = [model[0].weight.detach(), model[0].bias.detach(), model[2].weight.detach(), model[2].bias.detach()]
    _, j = jacobian(x, ["linear", "relu", "linear", "log_softmax"], params)
    assert_matches_reference(j, reference_jacobian(model, x), torch.float64)


def test_torch_export_with_a_dynamic_batch():
    model = mlp()
    module = NativeJacobian(model)
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        program = torch.export.export(module, (torch.randn(4, 6, dtype=torch.float64),), dynamic_shapes={"x": {0: batch}})
        for size in (1, 9):
            x = torch.randn(size, 6, dtype=torch.float64)
            y, j = program.module()(x)
            assert_matches_reference(j, reference_jacobian(model, x), torch.float64)
            assert_matches_reference(y, model(x), torch.float64)
