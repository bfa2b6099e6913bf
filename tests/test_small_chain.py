"""The CPU small-chain kernel (csrc/cpu/small_chain.cpp), which batch_jacobian runs for small plans and
narrow chains (or, where JACEXT_SMALL_CHAIN_MAX_MACS is set, for plans under that many multiply-adds),
against the ATen walker and torch.func.

Every small CPU model in the other tests already runs on it; here the same models run on both paths
(the limit is read once per process, so the other path runs in a subprocess), wide models are forced onto
it, and the default choice of path is pinned."""
import json
import os
import subprocess
import sys

import torch
from torch import nn

from conftest import assert_matches_reference, reference_jacobian

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HEADS = {"none": None, "softmax": lambda: nn.Softmax(-1), "log_softmax": lambda: nn.LogSoftmax(-1)}
ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, lambda: nn.GELU("tanh"), nn.SiLU, nn.ReLU6,
               lambda: nn.LeakyReLU(0.1), lambda: nn.ELU(0.7), lambda: nn.Softplus(2.0, 5.0), nn.Hardtanh,
               nn.Mish, nn.Hardswish, nn.Hardsigmoid]


def build_case(seed, widths, head, dtype, batch, special):
    """An MLP cycling through the activations, with a non-contiguous first weight and input."""
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=i % 2 == 0))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[(seed + i) % len(ACTIVATIONS)]())
    if HEADS[head] is not None:
        layers.append(HEADS[head]())
    model = nn.Sequential(*layers).to(dtype).eval()
    with torch.no_grad():
        model[0].weight = nn.Parameter(model[0].weight.detach().T.contiguous().T)
    x = (3 * torch.randn(batch, 2 * widths[0], dtype=dtype))[:, ::2]
    if special == "nan":
        x[0, 0] = float("nan")
    elif special == "inf":
        x[0, -1] = float("inf")
    return model, x


# Runs every case on the op in both modes in a fresh process (the limit is read once) and prints them.
CASES_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, "tests")
import jacobian_ext as jx
from test_small_chain import build_case
results = []
for spec in json.loads(sys.argv[1]):
    model, x = build_case(**dict(spec, dtype=getattr(torch, spec["dtype"])))
    for mode in ("forward", "reverse"):
        with torch.no_grad():
            y, J = jx.batch_jacobian(model, x, mode=mode, return_output=True)
        results.append({"y": y.double().tolist(), "J": J.double().tolist()})
print(json.dumps(results))
"""

SPECS = [
    {"seed": seed, "widths": widths, "head": head, "dtype": dtype, "batch": batch, "special": special}
    for seed, (widths, head, dtype, batch, special) in enumerate([
        ([5, 7, 3], "none", "float64", 4, ""),
        ([6, 9, 9, 4], "softmax", "float64", 3, ""),
        ([3, 8, 8, 8, 5], "log_softmax", "float64", 2, ""),
        ([1, 4, 1], "none", "float64", 5, ""),
        ([7, 5], "softmax", "float64", 1, ""),
        ([4, 6, 2], "none", "float64", 0, ""),
        ([5, 7, 3], "softmax", "float32", 6, ""),
        ([9, 12, 4], "log_softmax", "float32", 3, ""),
        ([4, 6, 3], "none", "float64", 3, "nan"),
        ([4, 6, 3], "softmax", "float64", 3, "inf"),
        # The register-blocked products' edges (blocks of up to 6 rows, tiles of 2 and 1 vectors of
        # 4 to 16 entries, then a scalar tail): 13 rows run as three blocks, 27 and 9 columns end in
        # every kind of tile for float32 and float64 alike; width 1 on both sides of a Linear.
        ([27, 13, 9, 13], "none", "float32", 3, ""),
        ([27, 13, 9, 13], "log_softmax", "float64", 2, ""),
        ([1, 17, 1, 33, 2], "softmax", "float32", 2, ""),
        ([11, 23, 7], "softmax", "float64", 0, ""),
        # Tiles of up to 32 samples, fewer to give each thread one when the call is large: the batches
        # end in partial tiles (of one sample too, whose products run row by row), and the products meet
        # both of the kernel's forms (register blocks from 16 float32 / 8 float64 columns and 3 rows,
        # row by row below) with widths of 1 and 2 at both ends (a narrow input and output, as in a PINN).
        # A NaN or infinity in one sample must reach no other sample of its tile.
        ([3, 40, 17, 5], "none", "float32", 37, ""),
        ([3, 40, 17, 5], "log_softmax", "float64", 33, "nan"),
        ([2, 64, 64, 1], "none", "float32", 70, ""),
        ([2, 64, 64, 1], "none", "float64", 65, ""),
        ([16, 33, 20, 4], "softmax", "float64", 65, "inf"),
        ([1, 24, 9, 2], "softmax", "float32", 97, ""),
        # Forward mode stacks a batch of 16 or more as rows times W^T, made for outputs of 16 float32
        # (8 float64) or more, and a smaller batch as columns: a narrow first layer without W^T.
        ([6, 5, 20, 3], "log_softmax", "float32", 40, ""),
    ])
] + [  # every activation at least once, in both positions of a two-activation chain
    {"seed": seed, "widths": [4, 6, 5, 3], "head": "none", "dtype": "float64", "batch": 3, "special": ""}
    for seed in range(20, 20 + len(ACTIVATIONS))
]


def run_cases(specs, max_macs):
    env = dict(os.environ, JACEXT_SMALL_CHAIN_MAX_MACS=max_macs)
    done = subprocess.run([sys.executable, "-c", CASES_SCRIPT, json.dumps(specs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def as_tensor(values):
    return torch.tensor(values, dtype=torch.float64)


def test_small_chain_equals_the_aten_walker_and_torch_func():
    """Both paths against torch.func; against each other where the input is finite. With a NaN or an
    infinity in the input the walker can differ from the reference: ATen's vectorised ELU backward
    kernel gives NaN at a NaN input where autograd's scalar tail (and rule_math.h) gives 1."""
    small, walker = run_cases(SPECS, "1e12"), run_cases(SPECS, "0")
    assert len(small) == len(walker) == 2 * len(SPECS)
    for index, (ours, theirs) in enumerate(zip(small, walker)):
        spec = SPECS[index // 2]
        dtype = getattr(torch, spec["dtype"])
        model, x = build_case(**dict(spec, dtype=dtype))
        reference = reference_jacobian(model, x)
        with torch.no_grad():
            output = model(x)
        shapes = {"y": output.shape, "J": reference.shape}  # JSON keeps no shape for B = 0
        jacobian = as_tensor(ours["J"]).reshape(reference.shape)
        assert torch.equal(jacobian.isnan(), reference.isnan()), spec
        assert_matches_reference(jacobian.nan_to_num(), reference.nan_to_num(), dtype)
        assert_matches_reference(as_tensor(ours["y"]).reshape(output.shape).nan_to_num(), output.nan_to_num(), dtype)
        if not spec["special"]:
            for key in ("y", "J"):
                assert_matches_reference(as_tensor(ours[key]).reshape(shapes[key]),
                                         as_tensor(theirs[key]).reshape(shapes[key]), dtype)


WIDE_SCRIPT = r"""
import json, torch
from torch import nn
import jacobian_ext as jx
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(300, 257), nn.ReLU(), nn.Linear(257, 130), nn.Tanh(), nn.Linear(130, 17),
                      nn.Softmax(-1)).double().eval()
x = torch.randn(5, 300, dtype=torch.float64)
torch.save((model, x), "MODEL_PATH")
out = {mode: jx.batch_jacobian(model, x, mode=mode) for mode in ("forward", "reverse")}
torch.save(out, "OUT_PATH")
"""


def test_wide_model_forced_onto_the_small_chain_kernel(tmp_path):
    """Widths beyond any vector length and block the loops might assume, on the kernel by force."""
    script = WIDE_SCRIPT.replace("MODEL_PATH", str(tmp_path / "model.pt")).replace("OUT_PATH", str(tmp_path / "j.pt"))
    env = dict(os.environ, JACEXT_SMALL_CHAIN_MAX_MACS="1e12")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    model, x = torch.load(tmp_path / "model.pt", weights_only=False)
    expected = reference_jacobian(model, x)
    for mode, jacobian in torch.load(tmp_path / "j.pt").items():
        assert_matches_reference(jacobian, expected, torch.float64)


def test_bad_limit_is_rejected():
    env = dict(os.environ, JACEXT_SMALL_CHAIN_MAX_MACS="lots")
    script = ("import torch, jacobian_ext as jx\n"
              "jx.batch_jacobian(torch.nn.Sequential(torch.nn.Linear(3, 2)), torch.randn(2, 3))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert "JACEXT_SMALL_CHAIN_MAX_MACS must be a non-negative number" in done.stderr


# Which path batch_jacobian takes under the default choice (no JACEXT_SMALL_CHAIN_MAX_MACS): the walker
# shows its GEMMs in a profile, the kernel none.
ROUTE_SCRIPT = r"""
import json, torch
import jacobian_ext  # registers torch.ops.jacext
torch.manual_seed(0)
def plan(widths, activation):
    layers, params = [], []
    for i in range(len(widths) - 1):
        layers.append("linear")
        params += [torch.randn(widths[i + 1], widths[i]) / widths[i] ** 0.5, torch.randn(widths[i + 1])]
        if i < len(widths) - 2:
            layers.append(activation)
    return layers, params
CASES = {
    "tiny": (plan([16, 64, 64, 4], "relu"), 1),
    "pinn": (plan([2, 64, 64, 64, 1], "tanh"), 1024),
    "narrow relu": (plan([16, 256, 256, 4], "relu"), 1024),
    "narrow gelu": (plan([16, 256, 256, 4], "gelu"), 1024),
    "mnist": (plan([784, 512, 512, 10], "relu"), 16),
    "many rows": (plan([32, 256, 256, 256, 64], "relu"), 64),
}
GEMMS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"}
routes = {}
for name, ((layers, params), batch) in CASES.items():
    x = torch.randn(batch, params[0].shape[1])
    with torch.no_grad(), torch.profiler.profile() as profile:
        torch.ops.jacext.batch_jacobian(x, layers, params, "reverse")
    routes[name] = "walker" if any(event.name in GEMMS for event in profile.events()) else "kernel"
print(json.dumps(routes))
"""


def test_default_choice_of_path():
    """Small plans and narrow chains of any batch size on the kernel; wide weights, many rows per sample
    (tiles of a sample or two) and activations that the kernel evaluates with scalar libm calls, beyond
    the small plans, on the walker."""
    env = dict(os.environ)
    env.pop("JACEXT_SMALL_CHAIN_MAX_MACS", None)
    done = subprocess.run([sys.executable, "-c", ROUTE_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "tiny": "kernel", "pinn": "kernel", "narrow relu": "kernel", "narrow gelu": "walker", "mnist": "walker",
        "many rows": "walker"}
