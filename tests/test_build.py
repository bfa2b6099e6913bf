"""The built library: its build record, and a kernel for every op on every backend it was built for."""
import importlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

import op_catalog
import jacobian_ext
from jacobian_ext import ops


def test_build_info_matches_the_running_torch():
    assert ops.build_info.TORCH_VERSION == torch.__version__


@pytest.mark.parametrize("name", op_catalog.OP_NAMES)
def test_every_op_has_a_kernel_for_each_built_backend(name):
    qualified = f"jacext::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Autograd")
    if ops.build_info.WITH_CUDA:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA")


def test_import_refuses_a_library_built_for_another_torch(monkeypatch):
    from jacobian_ext import _build_info, _loader

    monkeypatch.setattr(_build_info, "TORCH_VERSION", "0.0.1")
    with pytest.raises(ImportError, match=r"built against torch 0.0.1 but torch .* is running.*make build"):
        _loader.load_library()


def test_every_native_layer_name_is_accepted_by_the_op():
    x = torch.randn(2, 3)
    weight, bias = torch.randn(3, 3), torch.randn(3)
    for layer in op_catalog.LAYER_NAMES:
        params = {"linear": [weight, bias], "linear_no_bias": [weight]}.get(layer, [])
        _, jacobian = ops.batch_jacobian(x, [layer], params, "reverse")
        assert jacobian.shape == (2, 3, 3)


@pytest.mark.skipif(shutil.which("readelf") is None or not sys.platform.startswith("linux"), reason="needs readelf")
def test_library_uses_the_shared_cxx_runtime():
    # A static copy of libstdc++ inside our library (a toolchain's -static-libstdc++) keeps its own locale
    # state and crashed formatting numbers into error messages; setup.py links the shared one by its path.
    library = os.path.join(os.path.dirname(jacobian_ext.__file__), "_C.abi3.so")
    dynamic = subprocess.run(["readelf", "-d", library], capture_output=True, text=True, check=True).stdout
    assert "[libstdc++.so" in dynamic, dynamic
