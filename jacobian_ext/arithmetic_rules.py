"""Arithmetic on carried values: sums and differences of several, scaling by a constant (or a value that
carries no derivative), products and quotients of two carried values (squeeze-excitation, gating), and mean /
sum over per-sample axes."""
import math
import operator
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx

from .program import entry
from .blocks import NodeRule, explicit_block
from .index_rules import constant_getter, normalize_dim


class SumRule(NodeRule):
    """x + y, x - y, -x, x + constant (residual connections): the blocks of the inputs that carry a
    derivative, each times its coefficient (x + x has 2, x - x has 0); constants drop out."""

    label = "index map (sum)"

    def __init__(self, coefficients: Sequence[float], work_per_row: float):
        super().__init__(work_per_row)
        self.coefficients = list(coefficients)

    def forward(self, plan, g, env, tangents):
        value = plan.evaluator.evaluate(g.node, env)
        total = None
        for coefficient, tangent in zip(self.coefficients, tangents):
            block = explicit_block(tangent, value.shape[0], g.shape, value)
            term = block if coefficient == 1 else block * coefficient
            total = term if total is None else total + term
        return value, total

    def position_axes(self, plan, g):
        return len(g.shape)  # its inputs have the node's shape (sum_rule)

    def reverse(self, plan, g, env, cotangent):
        if all(c == 1 for c in self.coefficients):
            return [cotangent] * len(self.coefficients)
        value = env[g.node]
        block = explicit_block(cotangent, value.shape[0], g.shape, value)
        return [block if c == 1 else block * c for c in self.coefficients]

    def encode(self, plan, g, sources):
        """sum of coef_i * input_i plus at most one constant: a number, or a tensor of constant_getter's."""
        node = g.node
        constants = [(sign, arg) for sign, arg in zip(argument_signs(node), node.args) if arg not in g.inputs]
        attributes, getters = {"coef": ",".join(repr(float(c)) for c in self.coefficients)}, []
        if len(constants) > 1:
            return None
        for sign, constant in constants:
            if isinstance(constant, (int, float)) and not isinstance(constant, bool):
                attributes["offset"] = float(sign * constant)
                continue
            getter = constant_getter(plan, constant)
            if getter is None:
                return None  # a tensor reading the batch size or a sample's values: not a constant of the program
            attributes["offset_param"] = sign
            getters.append(getter)
        all_sources = [plan.slot_of(i) for i in g.inputs]
        return [(entry("add", all_sources, **attributes), getters)]


class ScaleRule(NodeRule):
    """x * c or x / c with c a constant (a number or a tensor that carries no derivative) that does
    not broadcast x to a larger shape: the block is scaled by c, broadcast past the rows axis."""

    label = "index map (scale)"
    reverse_allocates = True

    def __init__(self, constant, divide: bool, work_per_row: float):
        super().__init__(work_per_row)
        self.constant, self.divide = constant, divide  # a number, or the fx node of a tensor

    def constant_of(self, env):
        """The factor the block is multiplied by: a number or a tensor broadcastable to [B, *shape]."""
        c = env[self.constant] if isinstance(self.constant, fx.Node) else self.constant
        return 1.0 / c if self.divide else c

    def encode(self, plan, g, sources):
        if isinstance(self.constant, fx.Node):
            getter = constant_getter(plan, self.constant)
            if getter is None:
                return None  # a tensor reading the batch size or a sample's values: not a constant of the program
            return [(entry("scale", sources, divide=self.divide), [getter])]
        if not isinstance(self.constant, (int, float)) or isinstance(self.constant, bool):
            return None
        return [(entry("scale", sources, divide=self.divide, factor=float(self.constant)), [])]

    def _block_factor(self, env, ndim: int):
        factor = self.constant_of(env)
        if isinstance(factor, torch.Tensor) and factor.dim() == ndim:  # has the batch axis: add the rows axis
            factor = factor.unsqueeze(1)
        return factor

    def forward(self, plan, g, env, tangents):
        x = env[g.inputs[0]]
        tangent = explicit_block(tangents[0], x.shape[0], x.shape[1:], x)
        return plan.evaluator.evaluate(g.node, env), tangent * self._block_factor(env, x.dim())

    def reverse(self, plan, g, env, cotangent):
        x = env[g.inputs[0]]
        return [explicit_block(cotangent, x.shape[0], g.shape, x) * self._block_factor(env, x.dim())]


class ReductionRule(NodeRule):
    """x.mean(dims) / x.sum(dims) over per-sample axes (global average pooling written functionally,
    F.adaptive_avg_pool2d(x, 1)): the same reduction of the block over the same axes (forward); the
    cotangent spread back over the reduced axes, divided by their size for a mean (reverse)."""

    label = "index map (reduction)"

    def __init__(self, dims: Sequence[int], keepdim: bool, mean: bool, work_per_row: float):
        super().__init__(work_per_row)
        self.block_dims = sorted(d + 1 for d in dims)  # axes of [B, R, *shape]
        self.keepdim, self.mean = keepdim, mean

    def forward(self, plan, g, env, tangents):
        x = env[g.inputs[0]]
        tangent = explicit_block(tangents[0], x.shape[0], x.shape[1:], x)
        reduced = (tangent.mean if self.mean else tangent.sum)(self.block_dims, keepdim=True)
        return plan.evaluator.evaluate(g.node, env), reduced.reshape(x.shape[0], tangent.shape[1], *g.shape)

    def reverse(self, plan, g, env, cotangent):
        x = env[g.inputs[0]]
        block = explicit_block(cotangent, x.shape[0], g.shape, x)
        kept = [block.shape[0], block.shape[1]] + [1 if d + 2 in self.block_dims else size
                                                   for d, size in enumerate(x.shape[1:])]
        spread = block.reshape(kept).expand(block.shape[0], block.shape[1], *x.shape[1:])
        if self.mean:
            spread = spread / math.prod(x.shape[d - 1] for d in self.block_dims)
        return [spread]

    def encode(self, plan, g, sources):
        return [(entry("mean" if self.mean else "sum", sources, dims=[d - 2 for d in self.block_dims],
                       keepdim=self.keepdim), [])]


class ProductRule(NodeRule):
    """a * b (product rule: T_a b + a T_b) or a / b (quotient rule: T_a / b - a T_b / b^2) of two carried
    values, broadcast over per-sample axes; reverse sums each cotangent back to its factor's shape."""

    label = "native product"

    def __init__(self, first: fx.Node, second: fx.Node, divide: bool, work_per_row: float):
        super().__init__(work_per_row)
        self.first, self.second, self.divide = first, second, divide

    def _factors(self, env):
        """(d out / d first, d out / d second) per element, each with a rows axis: [B, 1, *shape]."""
        a, b = env[self.first], env[self.second]
        if self.divide:
            return (1 / b).unsqueeze(1), (-a / (b * b)).unsqueeze(1)
        return b.unsqueeze(1), a.unsqueeze(1)

    def forward(self, plan, g, env, tangents):
        by_input = dict(zip(g.inputs, tangents))
        total = None
        for source, factor in zip((self.first, self.second), self._factors(env)):
            x = env[source]
            term = explicit_block(by_input[source], x.shape[0], x.shape[1:], x) * factor
            total = term if total is None else total + term
        value = plan.evaluator.evaluate(g.node, env)
        return value, total.expand(value.shape[0], total.shape[1], *g.shape)

    def reverse(self, plan, g, env, cotangent):
        value = env[g.node]
        block = explicit_block(cotangent, value.shape[0], g.shape, value)
        pulled = {}
        for source, factor in zip((self.first, self.second), self._factors(env)):
            x = env[source]
            part = (block * factor).sum_to_size(block.shape[0], block.shape[1], *x.shape[1:])
            pulled[source] = part if source not in pulled else pulled[source] + part
        return [pulled[i] for i in g.inputs]

    def encode(self, plan, g, sources):
        factors = [plan.slot_of(self.first), plan.slot_of(self.second)]
        return [(entry("div" if self.divide else "mul", factors), [])]


ADD_FUNCTIONS = {operator.add, torch.add, operator.iadd}


SUB_FUNCTIONS = {operator.sub, torch.sub, operator.isub}


_MUL_FUNCTIONS = {operator.mul, torch.mul, operator.imul}


_DIV_FUNCTIONS = {operator.truediv, torch.div, operator.itruediv}


def is_product(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and (
        node.target in _MUL_FUNCTIONS or node.target in _DIV_FUNCTIONS or node.target in ("mul", "div"))


def is_sum_or_cat(node: fx.Node) -> bool:
    return node.op == "call_function" and (
        node.target in ADD_FUNCTIONS or node.target in SUB_FUNCTIONS or node.target in (torch.cat, torch.concat)
    )


REDUCTIONS = {torch.mean: True, "mean": True, torch.sum: False, "sum": False, F.adaptive_avg_pool2d: True,
               F.adaptive_avg_pool1d: True}


def reduction_rule(node: fx.Node, x: torch.Tensor, out_numel) -> Optional[NodeRule]:
    """mean/sum over explicit per-sample axes (no dtype argument); adaptive average pooling to size 1."""
    mean = REDUCTIONS[node.target]
    ndim = x.dim()
    if node.target in (F.adaptive_avg_pool2d, F.adaptive_avg_pool1d):
        spatial = 2 if node.target is F.adaptive_avg_pool2d else 1
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        sizes = size if isinstance(size, (tuple, list)) else (size,) * spatial
        if ndim < spatial + 2 or any(s != 1 for s in sizes) or len(sizes) != spatial:
            return None
        return ReductionRule(range(ndim - spatial, ndim), True, True, out_numel)
    kwargs = dict(node.kwargs)
    dims = node.args[1] if len(node.args) > 1 else kwargs.pop("dim", None)
    keepdim = node.args[2] if len(node.args) > 2 else kwargs.pop("keepdim", False)
    if dims is None or kwargs or len(node.args) > 3 or not isinstance(keepdim, bool):
        return None  # a reduction over every axis (the batch too), or a dtype argument
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims or not all(isinstance(d, int) for d in dims):
        return None
    dims = sorted({normalize_dim(d, ndim) for d in dims})
    if 0 in dims:
        return None  # reduces over the batch axis: mixes samples
    return ReductionRule(dims, keepdim, mean, out_numel)


def argument_signs(node: fx.Node) -> Sequence[float]:
    """The sign each positional argument of a sum, difference or negation enters the result with."""
    if node.target in (operator.neg, torch.neg, "neg"):
        return [-1.0]
    return [1.0, -1.0 if node.target in SUB_FUNCTIONS or node.target == "sub" else 1.0]


def sum_rule(node: fx.Node, values, inputs, out_numel) -> Optional[NodeRule]:
    out_shape = values[node].shape
    if node.kwargs or len(node.args) > 2 or any(values[i].shape != out_shape for i in inputs):
        return None  # alpha, or an input broadcast to a larger shape: fallback
    position_sign = argument_signs(node)
    coefficients = {i: 0.0 for i in inputs}
    for position, arg in enumerate(node.args):
        if isinstance(arg, fx.Node) and arg in coefficients:
            coefficients[arg] += position_sign[position]
    if any(i not in node.args for i in inputs):
        return None  # a derivative-carrying input hidden inside another argument
    return SumRule([coefficients[i] for i in inputs], out_numel)


def scale_rule(node: fx.Node, values, x_node, out_numel) -> Optional[NodeRule]:
    if len(node.args) != 2 or node.kwargs:
        return None
    first, second = node.args
    divide = node.target in _DIV_FUNCTIONS or node.target == "div"
    if divide and first is not x_node:
        return None  # c / x is not linear in x
    constant = second if first is x_node else first
    if constant is x_node:
        return None  # x * x
    constant_value = values[constant] if isinstance(constant, fx.Node) else constant
    if values[node].shape != values[x_node].shape:
        return None
    if isinstance(constant_value, torch.Tensor) and constant_value.dim() > values[x_node].dim():
        return None

    return ScaleRule(constant, divide, out_numel)


def product_rule(node: fx.Node, values, out_numel) -> Optional[NodeRule]:
    """a * b or a / b of two carried values with the same number of axes (broadcasting over per-sample axes,
    e.g. squeeze-excitation's [B, C, 1, 1] gate times [B, C, H, W])."""
    if len(node.args) != 2 or node.kwargs:
        return None
    first, second = node.args
    if values[first].dim() != values[second].dim():
        return None  # broadcasting would align a batch axis with a feature axis
    return ProductRule(first, second, node.target in _DIV_FUNCTIONS or node.target == "div", 3 * out_numel)
