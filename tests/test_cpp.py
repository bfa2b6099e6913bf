"""The C++ deployment path: examples/cpp/jacobian_demo, built by CMake from csrc/ against LibTorch
(`make cpp`), computes the same output and Jacobian as Python."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import jacobian_ext as jx
from conftest import assert_matches_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "build", "cpp", "jacobian_demo")
sys.path.insert(0, os.path.join(ROOT, "examples", "cpp"))
from export_model import export_model  # noqa: E402


@pytest.fixture(scope="module")
def demo():
    if not os.path.exists(DEMO):
        pytest.fail(f"{DEMO} is not built: run `make cpp` (`make test` does)")
    return DEMO


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpp_program_matches_python(demo, tmp_path, mode, dtype):
    model = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 7), nn.ReLU(), nn.Linear(7, 3),
                          nn.LogSoftmax(-1)).to(dtype).eval()
    x = torch.randn(4, 5, dtype=dtype)
    export_model(model, x, str(tmp_path / "model.pt"), mode)
    run = subprocess.run([demo, str(tmp_path / "model.pt"), str(tmp_path / "result.pt")], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "jacobian [4, 3, 5]" in run.stdout

    result_output, result_jacobian = torch.load(tmp_path / "result.pt")
    with torch.no_grad():
        output, jacobian = jx.compile(model, mode=mode)(x)
    assert_matches_reference(result_jacobian, jacobian, dtype)
    assert_matches_reference(result_output, output, dtype)


def test_cpp_program_reports_the_ops_errors(demo, tmp_path):
    torch.save({"layers": ["linear"], "params": [torch.randn(3, 4)], "x": torch.randn(2, 4), "mode": "reverse"},
               tmp_path / "bad.pt")
    run = subprocess.run([demo, str(tmp_path / "bad.pt")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "layer 0 (linear) needs 2 entries in params" in run.stderr


class ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.head = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head(h + torch.tanh(self.block(h)))


def resnet18():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(num_classes=3)


@pytest.mark.parametrize("make_model, shape", [(ResidualMLP, (5,)), (resnet18, (3, 16, 16))])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_cpp_program_runs_graph_programs(demo, tmp_path, make_model, shape, mode):
    """Graphs that are not chains (a subclassed residual MLP, resnet18) run as one graph program in C++ too."""
    torch.manual_seed(0)
    model = make_model().double().eval()
    x = torch.randn(2, *shape, dtype=torch.float64)
    export_model(model, x, str(tmp_path / "model.pt"), mode)
    run = subprocess.run([demo, str(tmp_path / "model.pt"), str(tmp_path / "result.pt")], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"jacobian [2, 3, {', '.join(map(str, shape))}]" in run.stdout, run.stdout
    result_output, result_jacobian = torch.load(tmp_path / "result.pt")
    with torch.no_grad():
        output, jacobian = jx.compile(model, mode=mode)(x)
    assert_matches_reference(result_jacobian, jacobian, torch.float64)
    assert_matches_reference(result_output, output, torch.float64)
