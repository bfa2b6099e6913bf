"""The masked Linear kernel of the chain walkers (ReLU mask, then a Linear: only the active units' rows of
W in reverse mode, of W^T in forward mode, are read) against torch.func, at active fractions on both sides
of the crossover.

Which branch runs depends on the batch's active fraction (sequential.cpp, skip_inactive_units):
the fractions below cover both sides of the measured crossover in-process, and the subprocess tests
force each branch for every fraction through JACEXT_MASKED_LINEAR_CROSSOVER (read once per process:
0 = always dense, 2 = always masked), with the small-chain kernel (which takes small plans before the
walker sees them) switched off by JACEXT_SMALL_CHAIN_MAX_MACS=0."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import jacobian_ext as jx
from conftest import assert_matches_reference, non_contiguous, output_terms_scale, reference_jacobian, single_sample
from jacobian_ext import ops

ACTIVE_FRACTIONS = [0.0, 0.05, 0.2, 0.5, 0.8, 1.0]
DTYPES = [torch.float64, torch.float32]
# (D, hidden widths, C): widths off the vector widths (4, 8 lanes) and the 2-vector column blocks,
# row counts off the register block (1 row; 7 = one block; 13 = 5 + 4 + 4 rows), and wide enough
# ones to run the full 2 x 8 register blocks.
SHAPES = [(29, (37, 21), 7), (70, (48, 33), 13), (16, (19,), 1), (64, (96, 64), 10)]
SHAPE_IDS = ["odd-widths", "tails", "one-row", "vector-multiples"]


def relu_mlp(in_features, hidden, out_features, active_fraction, dtype, head=None):
    """ReLU MLP whose hidden units are each active on about `active_fraction` of standard normal inputs:
    every bias is set from the pre-activation quantiles of a separate calibration batch."""
    widths = [in_features, *hidden, out_features]
    layers = []
    calibration = torch.randn(512, in_features, dtype=dtype)
    for i in range(len(widths) - 1):
        linear = nn.Linear(widths[i], widths[i + 1]).to(dtype)
        layers.append(linear)
        if i < len(widths) - 2:
            with torch.no_grad():
                pre = calibration @ linear.weight.T
                if active_fraction == 0.0:
                    linear.bias.copy_(-pre.abs().amax(0) - 10.0)  # far beyond any input's reach: all off
                elif active_fraction == 1.0:
                    linear.bias.copy_(pre.abs().amax(0) + 10.0)  # all on
                else:
                    linear.bias.copy_(-torch.quantile(pre, 1.0 - active_fraction, dim=0))
                calibration = torch.relu(pre + linear.bias)
            layers.append(nn.ReLU())
    if head is not None:
        layers.append(head)
    return nn.Sequential(*layers).eval()


def measured_active_fraction(model, x):
    """Fraction of ReLU outputs > 0 over all hidden layers (to check the construction)."""
    active, total, hidden = 0, 0, x
    for layer in model:
        hidden = layer(hidden)
        if isinstance(layer, nn.ReLU):
            active += (hidden > 0).sum().item()
            total += hidden.numel()
    return active / max(total, 1)


def same_masks_reference(model, x):
    """torch.func's Jacobian in float64, or for float32 in float32: the biases put many pre-activations
    near zero, and a unit whose float32 and float64 pre-activations fall on either side of it switches
    off in one and on in the other, an O(1) difference in J that no kernel error causes (seen at 5%
    active, B=64). In float32 both sides then see the same ReLU masks."""
    if x.dtype == torch.float64:
        return reference_jacobian(model, x)
    with torch.no_grad():
        return torch.func.vmap(torch.func.jacrev(single_sample(model)))(x)


def terms_scale(model, x) -> float:
    """Largest entry of the chain product taken over |W| with each sample's ReLU masks: the size of the
    terms that J sums. Where active units cancel, another summation order (the small-chain kernel's loops
    against torch's GEMMs) moves J by about u times this, not u times |J|."""
    largest = 0.0
    with torch.no_grad():
        for sample in x.double():
            product, h = None, sample
            for layer in model:
                if isinstance(layer, nn.Linear):
                    weight = layer.weight.double()
                    product = weight.abs() if product is None else weight.abs() @ product
                    h = h @ weight.T + (0 if layer.bias is None else layer.bias.double())
                elif isinstance(layer, nn.ReLU):
                    product = product * (h > 0).double()[:, None]
                    h = torch.relu(h)
            if product is not None and product.numel():
                largest = max(largest, float(product.max()))
    return largest


def inputs(batch, features, dtype):
    """Standard normal inputs in a non-contiguous layout."""
    return non_contiguous(torch.randn(batch, features, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("active_fraction", ACTIVE_FRACTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("batch", [0, 1, 7, 64])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_jacobian_at_each_active_fraction(mode, dtype, active_fraction, shape, batch):
    in_features, hidden, out_features = shape
    model = relu_mlp(in_features, hidden, out_features, active_fraction, dtype)
    x = inputs(batch, in_features, dtype)
    y, jacobian = jx.batch_jacobian(model, x, mode=mode, return_output=True)
    assert_matches_reference(y, model(x), dtype, scale=output_terms_scale(model, x))
    assert_matches_reference(jacobian, same_masks_reference(model, x), dtype, scale=terms_scale(model, x))
    if batch == 64 and active_fraction in (0.0, 1.0):
        assert measured_active_fraction(model, x) == active_fraction
    elif batch == 64:
        assert abs(measured_active_fraction(model, x) - active_fraction) < 0.1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("active_fraction", [0.05, 0.5, 0.9])  # all-on biases saturate the softmax
def test_softmax_head_and_explicit_cotangent(dtype, active_fraction):
    """A per-sample block reaches the first mask (softmax head; a given [B, R, C] cotangent), and a
    stored-transposed (non-contiguous) weight."""
    model = relu_mlp(23, (41, 30), 11, active_fraction, dtype, head=nn.Softmax(-1))
    with torch.no_grad():
        model[2].weight = nn.Parameter(model[2].weight.detach().T.contiguous().T)
    assert not model[2].weight.is_contiguous()
    x = inputs(9, 23, dtype)
    assert_matches_reference(jx.batch_jacobian(model, x, mode="reverse"), reference_jacobian(model, x), dtype)

    layers, params = ["linear", "relu", "linear", "relu", "linear", "softmax"], []
    for module in model:
        if isinstance(module, nn.Linear):
            params += [module.weight.detach(), module.bias.detach()]
    cotangent = torch.randn(9, 3, 11, dtype=dtype)
    output, result = ops.sequential_jac_reverse(x, cotangent, layers, params)
    expected = torch.einsum("brc,bcd->brd", cotangent.double(), reference_jacobian(model, x))
    assert_matches_reference(output, model(x), dtype)
    assert_matches_reference(result, expected, dtype)


FORCED_BRANCH_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, "tests")
import jacobian_ext as jx
from test_masked_linear import SHAPES, relu_mlp, inputs, same_masks_reference
errors = []
for dtype in (torch.float64, torch.float32):
    for active_fraction in (0.0, 0.05, 0.5, 1.0):
        for in_features, hidden, out_features in SHAPES:
            for batch in (0, 1, 7):
                model = relu_mlp(in_features, hidden, out_features, active_fraction, dtype)
                x = inputs(batch, in_features, dtype)
                expected = same_masks_reference(model, x).double()
                for mode in ("forward", "reverse"):
                    actual = jx.batch_jacobian(model, x, mode=mode).double()
                    scale = max(expected.abs().max().item(), 1e-300) if expected.numel() else 1.0
                    error = (actual - expected).abs().max().item() / scale if expected.numel() else 0.0
                    errors.append((str(dtype), active_fraction, batch, mode, error))
print(json.dumps(errors))
"""


@pytest.mark.parametrize("crossover", ["0", "2"], ids=["forced-dense", "forced-masked"])
def test_each_branch_forced_for_every_active_fraction(crossover):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JACEXT_MASKED_LINEAR_CROSSOVER=crossover, JACEXT_SMALL_CHAIN_MAX_MACS="0")
    done = subprocess.run([sys.executable, "-c", FORCED_BRANCH_SCRIPT], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(errors) == 2 * 4 * len(SHAPES) * 3 * 2
    tolerance = {"torch.float64": 1e-10, "torch.float32": 1e-5}
    bad = [e for e in errors if e[-1] > tolerance[e[0]]]
    assert not bad, bad


# Block heights the register blocks split differently: 1 to 13 rows, 23 (AVX-512: 12 + 11) and 25; and hundreds
# of active units before a 13-row block (several blocks), more than one L1-sized chunk of a panel's weight rows
# (masked_linear_kernel.h, kReusedWeightBytes), in both the two-vector panels and the one-vector tail columns.
ISA_SHAPES = SHAPES + [(12, (40, 35), 12), (9, (70,), 25), (11, (33, 65), 8), (23, (50,), 23), (6, (31, 20), 9),
                       (28, (1200,), 13)]

ISA_SCRIPT = r"""
import json, sys, torch
from torch import nn
sys.path.insert(0, "tests")
import jacobian_ext as jx
from test_masked_linear import ISA_SHAPES, relu_mlp, inputs, same_masks_reference, terms_scale
errors = []
torch.manual_seed(0)
for dtype in (torch.float64, torch.float32):
    for in_features, hidden, out_features in ISA_SHAPES:
        for head in (None, nn.Tanh()):
            model = relu_mlp(in_features, hidden, out_features, 0.5, dtype, head=head)
            for batch in (0, 1, 7):
                x = inputs(batch, in_features, dtype)
                expected = same_masks_reference(model, x).double()
                scale = max(terms_scale(model, x), 1e-300)
                for mode in ("forward", "reverse"):
                    actual = jx.batch_jacobian(model, x, mode=mode).double()
                    error = (actual - expected).abs().max().item() / scale if expected.numel() else 0.0
                    errors.append((str(dtype), in_features, out_features, batch, mode, error))
print(json.dumps(errors))
"""

# Which copy of the row products each path is forced onto: the masked kernel of the walker (small-chain
# kernel off, masked branch always), or the small-chain kernel (whose products are the dense row product).
KERNEL_ENVIRONMENTS = {
    "masked": {"JACEXT_MASKED_LINEAR_CROSSOVER": "2", "JACEXT_SMALL_CHAIN_MAX_MACS": "0"},
    "small-chain": {"JACEXT_SMALL_CHAIN_MAX_MACS": "1e12"},
}


def cpu_has(isa):
    """Whether this CPU runs the row products' copy for `isa` (torch's own capability check)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return {"baseline": True, "avx2": capability in ("AVX2", "AVX512"), "avx512": capability == "AVX512"}[isa]


@pytest.mark.parametrize("kernel", list(KERNEL_ENVIRONMENTS))
@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_each_instruction_set_copy_of_the_row_products(isa, kernel):
    """Every copy of masked_linear_kernel.h the CPU can run (JACEXT_ROW_PRODUCT_ISA picks one per
    process), at row counts that fill and split each copy's register blocks, against torch.func."""
    if not cpu_has(isa):
        pytest.skip(f"this CPU has no {isa}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JACEXT_ROW_PRODUCT_ISA=isa, **KERNEL_ENVIRONMENTS[kernel])
    done = subprocess.run([sys.executable, "-c", ISA_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(errors) == 2 * len(ISA_SHAPES) * 2 * 3 * 2
    tolerance = {"torch.float64": 1e-12, "torch.float32": 1e-5}
    bad = [e for e in errors if e[-1] > tolerance[e[0]]]
    assert not bad, bad


@pytest.mark.parametrize("variable, value, message", [
    ("JACEXT_MASKED_LINEAR_CROSSOVER", "half", "JACEXT_MASKED_LINEAR_CROSSOVER must be a number"),
    ("JACEXT_ROW_PRODUCT_ISA", "sse", "JACEXT_ROW_PRODUCT_ISA must be baseline, avx2 or avx512, got 'sse'"),
    ("JACEXT_ROW_PRODUCT_ISA", "AVX2", "JACEXT_ROW_PRODUCT_ISA must be baseline, avx2 or avx512, got 'AVX2'"),
])
def test_bad_environment_override_is_rejected(variable, value, message):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JACEXT_MASKED_LINEAR_CROSSOVER="2", JACEXT_SMALL_CHAIN_MAX_MACS="0")
    env[variable] = value
    script = ("import torch, jacobian_ext as jx\n"
              "m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))\n"
              "jx.batch_jacobian(m, torch.randn(2, 3), mode='reverse')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert "ValueError" in done.stderr and message in done.stderr
