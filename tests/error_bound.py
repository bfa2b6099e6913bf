"""A first-order, entrywise error bound for a Jacobian computed in a working precision, derived from the
problem instead of a blanket tolerance.

For a chain y = f_L ∘ … ∘ f_1, J = J_L ⋯ J_1 with per-sample layer Jacobians J_l. If each factor is
computed with an entrywise error |ΔJ_l| ≤ A_l and every product rounds like a dot product of its inner
length n (|fl(AB) − AB| ≤ n·u·|A||B|, to first order), then

    |Ĵ − J| ≤ Σ_l |J_L| ⋯ |J_{l+1}| · A_l · |J_{l−1}| ⋯ |J_1|,

whatever order the products are taken in (forward or reverse sweep). The absolute-value products make
this the condition of the chain: where the entries of J cancel, the bound grows with the cancelled
terms, not with |J|. The per-layer allowance A_l has three parts, all computed generically from
per-layer torch.func Jacobians (so a new layer type needs no code here):

- max |J_l^work(ĥ) − J_l^64(h)| over torch.func's reverse (jacrev) and forward (jacfwd) layer
  Jacobians in the working dtype, at the working-dtype forward values ĥ: what evaluating this layer's
  derivative in this precision costs anyone. It carries the sensitivity of the derivative to the
  rounding of its input (tanh' = 1 − tanh², softmax saturation, a ReLU whose pre-activation rounds
  across 0) and cancellation inside the layer that |J_l| does not show (the Jacobian of a LayerNorm
  over 2 features is a difference of O(1/σ) terms that nearly cancel). In float64, where no wider
  reference exists, the jacfwd-versus-jacrev difference alone estimates it (its per-sample maximum,
  spread over the layer's nonzero pattern).
- (n_l + 8)·u·|J_l|: rounding of the rule itself and of the product with the running block, where n_l
  is the layer's widest row or column of nonzeros (the inner length of either sweep's product).
- 4·u·max(1, max|J_l|) on J_l's nonzero pattern: a derivative formed as a difference of O(1) terms
  (1 − t² for tanh, s − s² for sigmoid and softmax) has an absolute error of a few u even where it is
  tiny (a saturated softmax: s₀ = 1 − 4e-9 is stored to within u of 1).

The chain is propagated in float64 as two blocks, P = |J_l| ⋯ |J_1| and the bound E, both [B, H_l, D].
"""
import copy
import math
from dataclasses import dataclass
from typing import List, Optional

import torch
from hypothesis import note
from hypothesis.control import currently_in_test_context
from torch.func import jacfwd, jacrev, vmap

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def _single_sample(fn):
    return lambda sample: fn(sample.unsqueeze(0)).squeeze(0)


def layer_jacobian(layer, h: torch.Tensor, transform=jacrev) -> torch.Tensor:
    """[B, out_features, in_features] (flattened per-sample shapes) of one layer at h [B, *in], float64."""
    with torch.no_grad():
        out_features = layer(h[:1]).numel()
        jacobian = vmap(transform(_single_sample(layer)))(h)
    return jacobian.reshape(h.shape[0], out_features, math.prod(h.shape[1:])).double()


@dataclass
class _Chain:
    """The propagation state after some layers: working-dtype and float64 values, P and E of the module
    docstring ([B, H, D]; None: the lazy identity and zero), and the output bound [B, H]."""

    hidden: torch.Tensor
    hidden64: torch.Tensor
    product: Optional[torch.Tensor]
    bound: Optional[torch.Tensor]
    value_bound: torch.Tensor

    def explicit(self):
        """(P, E) as tensors (the identity and zero made explicit, for a sum or concatenation)."""
        if self.product is not None:
            return self.product, self.bound
        batch, features = self.hidden.shape[0], math.prod(self.hidden.shape[1:])
        eye = torch.eye(features, dtype=torch.float64).expand(batch, features, features)
        return eye, torch.zeros_like(eye)


def _input_sensitivity(layer64, hidden64, jacobian64, value_bound, u: float) -> torch.Tensor:
    """max |J_l(h + Δ) − J_l(h)| in float64 over two perturbations Δ the size of the input's error
    (value_bound) plus 4 u |h|, the rounding of the input itself (a mean subtracted in another summation
    order): what evaluating the derivative at a slightly different input costs. jacfwd and jacrev share
    torch's forward values, so their spread does not show it: found by the graph property on a float64
    LayerNorm over three nearly equal features (a BatchNorm's output at input scale 1e-3), whose Jacobian
    (1.7e3) is 1/σ of differences 1e-3 of O(1) values; ours and torch's differed by 1.2x the bound before.
    Signs alternate over the features in one perturbation (never a shift, which a norm ignores) and are
    random in the other. Linear layers have a constant Jacobian: 0 for them."""
    size = value_bound.reshape(hidden64.shape) + 4 * u * hidden64.abs()
    features = hidden64[0].numel()
    alternating = (torch.arange(features) % 2 * 2 - 1).double().reshape(hidden64.shape[1:])
    random = torch.randint(0, 2, hidden64.shape, generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    return torch.maximum(*((layer_jacobian(layer64, hidden64 + size * signs) - jacobian64).abs()
                           for signs in (alternating, random)))


def _through_layer(layer, layer64, chain: _Chain, u: float) -> _Chain:
    hidden, hidden64, x = chain.hidden, chain.hidden64, chain.hidden
    jacobian64 = layer_jacobian(layer64, hidden64)
    magnitude = jacobian64.abs()
    # The jacfwd-vs-jacrev spread estimates the layer's evaluation error: an estimate, not a bound, so
    # taken per sample over the whole layer (two evaluations can agree by chance on one entry) with
    # a factor 4 of headroom (ours missed a 2-feature LayerNorm by 1.08x the plain spread).
    spread = (layer_jacobian(layer, hidden, jacfwd) - jacobian64).abs()
    own_error = 4 * spread.amax((1, 2), keepdim=True) * ((jacobian64 != 0) | (spread != 0))
    if x.dtype != torch.float64:
        own_error = torch.maximum(own_error, (layer_jacobian(layer, hidden) - jacobian64).abs())
    own_error = own_error + _input_sensitivity(layer64, hidden64, jacobian64, chain.value_bound, u)
    nonzero = (jacobian64 != 0) | (own_error != 0)
    inner = max(int(nonzero.sum(2).max()), int(nonzero.sum(1).max())) if nonzero.numel() else 0
    floor = 4 * u * magnitude.amax((1, 2), keepdim=True).clamp_min(1.0) * nonzero
    allowance = own_error + (inner + 8) * u * magnitude + floor

    with torch.no_grad():
        next_hidden, next_hidden64 = layer(hidden), layer64(hidden64)
    # Values: the rounding of this layer's output and of its inner products, plus what the
    # working dtype's own forward of this layer does differently, then carried on by |J_l|.
    flat64 = next_hidden64.reshape(x.shape[0], -1)
    in_abs = hidden64.reshape(x.shape[0], -1).abs()
    # The last term: an output formed from differences of inputs and of O(1) quantities has an absolute
    # error of a few u (1 + max|h|) even where it is tiny: log-softmax's z - max - log(sum exp), whose
    # log of a sum >= 1 rounds to about u absolute (seen: a float64 output of -1.8e-4 off by 2.2e-16,
    # over a bound of 1.3e-17 that |J| |h| gave, once our kernel and torch's summed differently).
    rounding = ((inner + 8) * u * (flat64.abs() + torch.einsum("boi,bi->bo", magnitude, in_abs))
                + 4 * u * (1 + in_abs.amax(1, keepdim=True)))
    value_bound = torch.einsum("boi,bi->bo", magnitude, chain.value_bound) + rounding
    if x.dtype != torch.float64:
        value_bound = value_bound + (layer(hidden64.to(x.dtype)).double() - next_hidden64).abs().reshape_as(flat64)

    if chain.product is None:
        product, bound = magnitude, allowance
    else:
        bound = magnitude @ chain.bound + allowance @ chain.product
        product = magnitude @ chain.product
    return _Chain(next_hidden, next_hidden64, product, bound, value_bound)


def _through_fork(fork, fork64, chain: _Chain, u: float) -> _Chain:
    """A layer with `branches` (each a chain of layers, empty for the identity) whose outputs `join`
    combines, by a sum or difference or, when `combine == "cat"`, a concatenation along the channel
    axis (the flattened features of each branch, one after the other). A sum's P adds the branches'
    P (|a ± b| <= |a| + |b|), and its rounding, u times the summed magnitudes, joins E."""
    branches = [_through_chain(list(b), list(b64), chain, u) for b, b64 in zip(fork.branches, fork64.branches)]
    with torch.no_grad():
        hidden = fork.join([b.hidden for b in branches])
        hidden64 = fork64.join([b.hidden64 for b in branches])
    products, bounds = zip(*(b.explicit() for b in branches))
    if fork.combine == "cat":
        return _Chain(hidden, hidden64, torch.cat(products, 1), torch.cat(bounds, 1),
                      torch.cat([b.value_bound for b in branches], 1))
    magnitudes = sum(b.hidden64.reshape(b.value_bound.shape).abs() for b in branches)
    product = sum(products)
    return _Chain(hidden, hidden64, product, sum(bounds) + u * product,
                  sum(b.value_bound for b in branches) + u * magnitudes)


def _through_chain(layers, layers64, chain: _Chain, u: float) -> _Chain:
    for layer, layer64 in zip(layers, layers64):
        step = _through_fork if hasattr(layer, "branches") else _through_layer
        chain = step(layer, layer64, chain, u)
    return chain


def chained_bounds(layers: List[torch.nn.Module], layers64: List[torch.nn.Module], x: torch.Tensor):
    """(Jacobian bound [B, C, D], output bound [B, C]): entrywise first-order bounds on the error of a
    working-dtype (x.dtype) computation of J and y, against the float64 values of the same model.
    A layer may be a fork (`_through_fork`): the chain is then a DAG of chains."""
    start = _Chain(x, x.double(), None, None, torch.zeros(x.shape[0], math.prod(x.shape[1:]), dtype=torch.float64))
    chain = _through_chain(layers, layers64, start, UNIT_ROUNDOFF[x.dtype])
    return chain.explicit()[1], chain.value_bound


# The bound is first order (it drops products of two rounding errors); a factor 2 covers the rest.
SAFETY = 2.0


def assert_within(actual, expected, bound, what):
    actual = actual.detach().double().reshape(expected.shape)
    error = (actual - expected).abs()
    allowed = SAFETY * bound.reshape(expected.shape)
    both_nan = actual.isnan() & expected.isnan()
    bad = ~(error <= allowed) & ~both_nan & ~(actual == expected)  # == covers matching infinities
    if bad.any():
        index = tuple(bad.nonzero()[0].tolist())
        ratio = (error / allowed.clamp_min(1e-300))[~both_nan].max().item()
        raise AssertionError(f"{what}: {int(bad.sum())} entries outside the bound; first at {index}: "
                             f"got {actual[index].item()!r}, expected {expected[index].item()!r}, "
                             f"bound {allowed[index].item():.3e}; worst error/bound {ratio:.3g}")
    if currently_in_test_context() and error.numel():
        note(f"{what}: worst error/bound {(error / allowed.clamp_min(1e-300)).max().item():.3g}")


class Reference:
    """float64 values for a model and input: model64(x), vmap(jacrev) and the error bounds of chained_bounds;
    check() compares a working-precision (y, J) against them."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor):
        model64 = copy.deepcopy(model).double()
        x64 = x.double()
        with torch.no_grad():
            self.output = model64(x64)
        self.jacobian = vmap(jacrev(_single_sample(model64)))(x64)
        # An nn.Sequential is its chain of layers; a graph model (tests/graph_strategies.py) names its own.
        layers, layers64 = (list(getattr(m, "stages", m)) for m in (model, model64))
        self.jacobian_bound, self.output_bound = chained_bounds(layers, layers64, x)

    def check(self, output, jacobian, what, rows=slice(None)):
        assert_within(output, self.output[rows], self.output_bound[rows], f"{what} output")
        assert_within(jacobian, self.jacobian[rows], self.jacobian_bound[rows], f"{what} Jacobian")
