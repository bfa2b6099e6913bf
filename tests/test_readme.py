"""Every Python example in the README runs as written, on a small model standing in for the reader's."""
import re
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def names():
    """What the examples assume the reader has: a model of 10 classes, inputs, labels, baselines, data."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    x = torch.randn(5, 8)
    return {"torch": torch, "model": model, "x": x, "x2": torch.randn(3, 8), "labels": torch.tensor([0, 1, 2, 3, 9]),
            "b": torch.zeros_like(x), "data": torch.randn(20, 8)}


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write files ("out/", "jacobian.pt2")
    torch._dynamo.reset()
    namespace = names()
    if "jx." in BLOCKS[index] and "import jacobian_ext as jx" not in BLOCKS[index]:
        exec("import jacobian_ext as jx", namespace)  # the API block's import, as a reader carries it on
    exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), namespace)
