"""The rules attention is made of: matrix products of carried values (q k^T, p v, also written as einsum),
softmax over one axis of N-d features, F.scaled_dot_product_attention as one node built from both, and cosine
attention's F.normalize.

A product's factors multiply blocks [B, R, ..., n, k] (blocks.py) with a rows axis R: a carried value gets
that axis as a size-1 axis, so torch.matmul broadcasts it over the rows; a constant (a weight) broadcasts
over the batch and rows axes as it does over the batch. Softmax over an axis folds every other axis into the
batch of the native [B, H] rules, which are saturation-stable (csrc/jacext/rule_math.h)."""
import math
import operator
import string
from typing import List, Optional, Sequence, Tuple

import torch
from torch import fx

from . import ops
from .blocks import NodeRule, call_arguments, explicit_block
from .index_rules import attribute_getter, constant_getter
from .program import attention_scores, entry

MATMULS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"}
EINSUMS = {torch.einsum, torch.functional.einsum}  # one function today; a set in case a release splits them


# ---- the math, shared by the rules ----

def product_tangent(a, b, t_a: Optional[torch.Tensor], t_b: Optional[torch.Tensor]) -> torch.Tensor:
    """T_out = T_a b + a T_b for out = a @ b (a block None: that factor carries no derivative)."""
    terms = [t_a @ b if t_a is not None else None, a @ t_b if t_b is not None else None]
    terms = [term for term in terms if term is not None]
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def product_cotangents(a, b, block: torch.Tensor, wanted: Sequence[bool]):
    """(G b^T, a^T G) for out = a @ b, each only where wanted (else None), before summing to a factor's shape."""
    return (block @ b.transpose(-1, -2) if wanted[0] else None, a.transpose(-1, -2) @ block if wanted[1] else None)


def _sum_to_block(block: torch.Tensor, like: torch.Tensor, rows: int) -> torch.Tensor:
    """A broadcast product's cotangent summed back to a carried value's block shape [B, R, *sample]."""
    return block.sum_to_size(like.shape[0], rows, *like.shape[1:])


def softmax_tangent(x: torch.Tensor, block: torch.Tensor, axis: int, log: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(value, tangent) of softmax (or log-softmax) over per-sample axis `axis` of x [B, *shape] for the tangent
    block [B, R, *shape]."""
    rows, features = block.shape[1], x.shape[1 + axis]
    folded = block.movedim(2 + axis, -1).movedim(1, -1)  # [B, *others, H, R]: the ops' [N, H, R]
    moved = x.movedim(1 + axis, -1)
    forward_op = ops.log_softmax_jac_forward if log else ops.softmax_jac_forward
    output, tangent = forward_op(moved.reshape(-1, features), folded.reshape(-1, features, rows))
    value = output.reshape(moved.shape).movedim(-1, 1 + axis)
    return value, tangent.reshape(folded.shape).movedim(-1, 1).movedim(-1, 2 + axis)


def softmax_cotangent(output: torch.Tensor, block: torch.Tensor, axis: int, log: bool) -> torch.Tensor:
    """The cotangent of softmax's input from its output [B, *shape] (log-probabilities for log-softmax) and
    the output's cotangent block [B, C, *shape]."""
    rows, features = block.shape[1], output.shape[1 + axis]
    folded = block.movedim(2 + axis, -1).movedim(1, -2)  # [B, *others, C, H]: the ops' [N, C, H]
    reverse_op = ops.log_softmax_jac_reverse if log else ops.softmax_jac_reverse
    pulled = reverse_op(output.movedim(1 + axis, -1).reshape(-1, features), folded.reshape(-1, rows, features))
    return pulled.reshape(folded.shape).movedim(-2, 1).movedim(-1, 2 + axis)


# ---- the rules ----

def _operand_values(env, operands):
    return [env[o] if isinstance(o, fx.Node) else o for o in operands]


class MatmulRule(NodeRule):
    """a @ b (matmul, bmm) with a carried factor on either side or both."""

    label = "native matmul"

    def __init__(self, first, second, carried: Tuple[bool, bool], work_per_row: float):
        super().__init__(work_per_row)
        self.operands, self.carried = (first, second), carried

    def _factors(self, env):
        return [v.unsqueeze(1) if c else v for v, c in zip(_operand_values(env, self.operands), self.carried)]

    def forward(self, plan, g, env, tangents):
        by_input = dict(zip(g.inputs, tangents))
        blocks = [explicit_block(by_input[o], env[o].shape[0], env[o].shape[1:], env[o]) if c else None
                  for o, c in zip(self.operands, self.carried)]
        return plan.evaluator.evaluate(g.node, env), product_tangent(*self._factors(env), *blocks)

    def reverse(self, plan, g, env, cotangent):
        value = env[g.node]
        block = explicit_block(cotangent, value.shape[0], g.shape, value)
        pulled = {}
        for operand, part in zip(self.operands, product_cotangents(*self._factors(env), block, self.carried)):
            if part is not None:
                part = _sum_to_block(part, env[operand], block.shape[1])
                pulled[operand] = part if operand not in pulled else pulled[operand] + part  # x @ x
        return [pulled[i] for i in g.inputs]

    def encode(self, plan, g, sources):
        if all(self.carried):
            return [(entry("matmul", [plan.slot_of(o) for o in self.operands]), [])]
        side = self.carried.index(False)
        found = _parameter_factor(plan, self.operands[side])
        if found is None:
            return None  # a constant computed in the forward (a slice of a weight), or a tensor literal: not a
            # parameter or buffer the program can read at every call
        parameter, transpose = found
        carried = self.operands[1 - side]
        return [(entry("matmul", [plan.slot_of(carried)], constant=side, transpose=transpose),
                 [attribute_getter(plan, parameter)])]


_TRANSPOSES = {"t", torch.t, "transpose", torch.transpose}


def _parameter_factor(plan, operand) -> Optional[Tuple[fx.Node, bool]]:
    """(get_attr node, transposed) where a constant factor is a parameter or buffer, or its transpose over the
    last two axes (x @ W.t(), W.T, W.mT, W.transpose(-2, -1): nn.MultiheadAttention's projections); None else."""
    if not isinstance(operand, fx.Node):
        return None
    if operand.op == "get_attr":
        return operand, False
    source = operand.args[0] if operand.args else None
    if not (isinstance(source, fx.Node) and source.op == "get_attr"):
        return None
    ndim = attribute_getter(plan, source)().dim()
    if operand.op in ("call_method", "call_function") and operand.target in _TRANSPOSES and not operand.kwargs:
        axes = operand.args[1:]
        if operand.target in ("t", torch.t) and not axes and ndim == 2:
            return source, True
        if len(axes) == 2 and all(isinstance(a, int) for a in axes) and {a % ndim for a in axes} == {ndim - 2, ndim - 1}:
            return source, True
    if operand.op == "call_function" and operand.target is getattr and len(operand.args) == 2:
        if operand.args[1] == "mT" or (operand.args[1] == "T" and ndim == 2):
            return source, True
    return None


class EinsumRule(NodeRule):
    """torch.einsum of any number of operands, some carried. einsum is linear in each operand, so the tangent is
    one einsum per carried operand with its tangent block in its place, and an operand's cotangent is the einsum
    of the output's cotangent block with the other operands. The equations are written once on explicit letters:
    each carried value's batch letter first (values are stored batch-first) and a rows letter after it in the
    blocks, which the einsum carries along like any output letter."""

    label = "native einsum"

    def __init__(self, operands, letters: Sequence[str], output: str, carried: Sequence[bool], rows: str,
                 work_per_row: float):
        super().__init__(work_per_row)
        self.operands = tuple(operands)
        self.letters, self.output, self.carried = list(letters), output, list(carried)
        block_letters = [_with_rows(spec, rows) if c else spec for spec, c in zip(letters, carried)]
        output_block = _with_rows(output, rows)

        def equation(specs, result):
            return ",".join(specs) + "->" + result

        self.tangent_equations, self.cotangent_equations, self.unreached = {}, {}, {}
        for k, (spec, block_spec) in enumerate(zip(letters, block_letters)):
            if not carried[k]:
                continue
            self.tangent_equations[k] = equation([*letters[:k], block_spec, *letters[k + 1:]], output_block)
            others = [output_block, *letters[:k], *letters[k + 1:]]
            reached = set("".join(others))
            # A letter summed inside this operand alone is in no other term: the cotangent is the same all
            # along it, so the einsum leaves it out and the block is expanded along it after.
            kept = "".join(letter for letter in block_spec if letter in reached)
            self.cotangent_equations[k] = equation(others, kept)
            self.unreached[k] = [axis for axis, letter in enumerate(block_spec) if letter not in reached]

    def forward(self, plan, g, env, tangents):
        values = _operand_values(env, self.operands)
        by_input = dict(zip(g.inputs, tangents))
        tangent = None
        for k, equation in self.tangent_equations.items():
            v = values[k]
            block = explicit_block(by_input[self.operands[k]], v.shape[0], v.shape[1:], v)
            term = torch.einsum(equation, *values[:k], block, *values[k + 1:])
            tangent = term if tangent is None else tangent + term
        return plan.evaluator.evaluate(g.node, env), tangent

    def reverse(self, plan, g, env, cotangent):
        value = env[g.node]
        block = explicit_block(cotangent, value.shape[0], g.shape, value)
        values = _operand_values(env, self.operands)
        pulled = {}
        for k, equation in self.cotangent_equations.items():
            part = torch.einsum(equation, block, *values[:k], *values[k + 1:])
            for axis in self.unreached[k]:
                part = part.unsqueeze(axis)
            v = values[k]
            shape = (v.shape[0], block.shape[1], *v.shape[1:])
            # Axes this operand broadcast (size 1 against the others) sum back; unreached ones expand.
            part = part.sum_to_size([s if p != 1 else 1 for p, s in zip(part.shape, shape)]).expand(shape)
            operand = self.operands[k]
            pulled[operand] = part if operand not in pulled else pulled[operand] + part  # einsum(eq, x, x)
        return [pulled[i] for i in g.inputs]

    def encode(self, plan, g, sources):
        """One `einsum` entry on the stored letters (each carried operand's batch letter first), the carried
        operands as values, the others as params (constant_getter)."""
        slots, constants, getters = [], [], []
        for operand, carried in zip(self.operands, self.carried):
            constants.append(not carried)
            if carried:
                slots.append(plan.slot_of(operand))
                continue
            getter = (lambda operand=operand: operand) if isinstance(operand, torch.Tensor) else \
                constant_getter(plan, operand)
            if getter is None:
                return None  # a tensor reading the batch size or a sample's values: not a constant of the program
            getters.append(getter)
        equation = ",".join(self.letters) + "->" + self.output
        return [(entry("einsum", slots, equation=equation, constants=constants), getters)]


def _with_rows(spec: str, rows: str) -> str:
    """A batch-first value's letters as its block's: the rows letter after the batch letter."""
    return spec[:1] + rows + spec[1:]


class AxisSoftmaxRule(NodeRule):
    """softmax / log-softmax over one axis of N-d per-sample features (attention's scores over the keys)."""

    def __init__(self, log: bool, axis: int, work_per_row: float):
        super().__init__(work_per_row)
        self.label = "native log_softmax (axis)" if log else "native softmax (axis)"
        self.log, self.axis = log, axis  # axis: per-sample

    def forward(self, plan, g, env, tangents):
        x = env[g.inputs[0]]
        return softmax_tangent(x, explicit_block(tangents[0], x.shape[0], x.shape[1:], x), self.axis, self.log)

    def reverse(self, plan, g, env, cotangent):
        value = env[g.node]
        return [softmax_cotangent(value, explicit_block(cotangent, value.shape[0], g.shape, value), self.axis,
                                  self.log)]

    def encode(self, plan, g, sources):
        return [(entry("log_softmax_axis" if self.log else "softmax_axis", sources, dim=self.axis), [])]


class NormalizeRule(NodeRule):
    """F.normalize(x, p=2, dim, eps): y = x / max(|x|, eps) over one per-sample axis (cosine attention's queries
    and keys). Its Jacobian (I - s y y^T) / max(|x|, eps), with s = [|x| >= eps] (below eps the clamp passes no
    derivative of the norm), is symmetric: the same map pushes tangents forward and pulls cotangents back."""

    label = "native normalize"

    def __init__(self, axis: int, eps: float, work_per_row: float):
        super().__init__(work_per_row)
        self.axis, self.eps = axis, eps  # axis: of [B, *shape], not 0

    def _map(self, x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        norm = x.norm(2, self.axis, keepdim=True)
        denominator = norm.clamp_min(self.eps)
        y = (x / denominator).unsqueeze(1)
        along = (y * block).sum(self.axis + 1, keepdim=True) * (norm >= self.eps).unsqueeze(1)
        return (block - y * along) / denominator.unsqueeze(1)

    def position_axes(self, plan, g):
        return self.axis - 1  # the per-sample axes before the normalised one

    def forward(self, plan, g, env, tangents):
        x = env[g.inputs[0]]
        tangent = explicit_block(tangents[0], x.shape[0], x.shape[1:], x)
        return plan.evaluator.evaluate(g.node, env), self._map(x, tangent)

    def reverse(self, plan, g, env, cotangent):
        x = env[g.inputs[0]]
        return [self._map(x, explicit_block(cotangent, x.shape[0], g.shape, x))]

    def encode(self, plan, g, sources):
        return [(entry("normalize", sources, dim=self.axis - 1, eps=self.eps), [])]


class AttentionRule(NodeRule):
    """F.scaled_dot_product_attention(q, k, v) without dropout: s = q k^T * scale (+ mask), p = softmax(s),
    out = p v, each step's rule in turn (the probabilities are recomputed in reverse, not kept)."""

    label = "native attention"
    reverse_allocates = True

    def __init__(self, operands, carried: Tuple[bool, bool, bool], mask, causal: bool, scale: Optional[float],
                 work_per_row: float):
        super().__init__(work_per_row)
        self.operands, self.carried = operands, carried  # q, k, v: fx nodes (carried or not)
        self.mask, self.causal, self.scale = mask, causal, scale  # mask: an fx node, a tensor or None

    def _scores(self, env):
        """(s [B, ..., L, S], scale) as the math reference of F.scaled_dot_product_attention computes them."""
        q, k, _ = _operand_values(env, self.operands)
        mask = env[self.mask] if isinstance(self.mask, fx.Node) else self.mask
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        return attention_scores(q, k, mask, self.causal, scale), scale

    def _factors(self, env):
        return [v.unsqueeze(1) for v in _operand_values(env, self.operands)]

    def forward(self, plan, g, env, tangents):
        by_input = dict(zip(g.inputs, tangents))
        t_q, t_k, t_v = [explicit_block(by_input[o], env[o].shape[0], env[o].shape[1:], env[o]) if c else None
                         for o, c in zip(self.operands, self.carried)]
        q, k, v = self._factors(env)
        scores, scale = self._scores(env)
        t_scores = None
        if t_q is not None or t_k is not None:
            t_scores = product_tangent(q, k.transpose(-1, -2), t_q, None if t_k is None else t_k.transpose(-1, -2))
            t_scores = t_scores * scale
        last = scores.dim() - 2  # the keys' per-sample axis
        if t_scores is None:
            probabilities, t_probabilities = torch.softmax(scores, -1), None
        else:
            probabilities, t_probabilities = softmax_tangent(scores, t_scores, last, log=False)
        value = plan.evaluator.evaluate(g.node, env)
        return value, product_tangent(probabilities.unsqueeze(1), v, t_probabilities, t_v)

    def reverse(self, plan, g, env, cotangent):
        """The products' cotangents as einsums of the rows block with q, k, v or the probabilities, which carry
        no rows axis: einsum folds the rows into the matrices' rows, one product per sample and head where a
        broadcast matmul would run one per row, sample and head."""
        value = env[g.node]
        block = explicit_block(cotangent, value.shape[0], g.shape, value)
        q, k, v = _operand_values(env, self.operands)
        scores, scale = self._scores(env)
        probabilities = torch.softmax(scores, -1)
        pulled = {}

        def add(operand, part):
            part = _sum_to_block(part, env[operand], block.shape[1])
            pulled[operand] = part if operand not in pulled else pulled[operand] + part  # self-attention q = k = v

        if self.carried[2]:
            add(self.operands[2], torch.einsum("b...qk,br...qd->br...kd", probabilities, block))
        if self.carried[0] or self.carried[1]:
            g_probabilities = torch.einsum("br...qd,b...kd->br...qk", block, v)
            g_scores = softmax_cotangent(probabilities, g_probabilities, probabilities.dim() - 2, log=False) * scale
            if self.carried[0]:
                add(self.operands[0], torch.einsum("br...qk,b...kd->br...qd", g_scores, k))
            if self.carried[1]:
                add(self.operands[1], torch.einsum("br...qk,b...qd->br...kd", g_scores, q))
        return [pulled[i] for i in g.inputs]

    def encode(self, plan, g, sources):
        if not all(self.carried):
            return None  # a constant query, key or value (a fixed memory): the entry reads all three as values
        attributes, getters = {"causal": self.causal, "mask": self.mask is not None}, []
        if self.scale is not None:
            attributes["scale"] = float(self.scale)
        if self.mask is not None:
            if not (isinstance(self.mask, fx.Node) and self.mask.op == "get_attr"):
                return None  # a mask computed in the forward (swin's) or a tensor literal: not a parameter or
                # buffer the program can read at every call
            mask, scores_rank = attribute_getter(plan, self.mask)(), len(g.shape) + 1
            if mask.dim() > scores_rank or (mask.dim() == scores_rank and mask.shape[0] != 1):
                return None  # a mask along the batch axis holds the probe's batch size, not any batch's
            getters.append(attribute_getter(plan, self.mask))
        return [(entry("attention", [plan.slot_of(o) for o in self.operands], **attributes), getters)]


# ---- choosing them ----

def matmul_rule(node: fx.Node, values, inputs) -> Optional[NodeRule]:
    """a @ b with per-sample matrices (each carried operand [B, ..., n, k]); a constant operand must be a matrix
    that cannot reach the batch axis (fewer axes than a sample of the carried one)."""
    if len(node.args) != 2 or node.kwargs:
        return None
    carried = tuple(isinstance(a, fx.Node) and a in inputs for a in node.args)
    operands = [values[a] if isinstance(a, fx.Node) else a for a in node.args]
    if not all(isinstance(v, torch.Tensor) for v in operands):
        return None
    carried_dims = {v.dim() for v, c in zip(operands, carried) if c}
    if len(carried_dims) != 1 or min(carried_dims) < 3:
        return None  # vectors, or two carried operands whose batch axes broadcasting would not align
    if not all(2 <= v.dim() < min(carried_dims) for v, c in zip(operands, carried) if not c):
        return None
    inner = operands[0].shape[-1]
    return MatmulRule(*node.args, carried, sum(carried) * 2 * math.prod(values[node].shape[1:]) * inner)


def axis_softmax_rule(layer: str, dim: Optional[int], x: torch.Tensor, out_numel) -> Optional[NodeRule]:
    """Softmax over one axis of N-d per-sample features (the [B, H] case is the chain layers' rule)."""
    if dim is None or x.dim() < 3:
        return None
    axis = dim + x.dim() if dim < 0 else dim
    if axis == 0:
        return None  # over the batch: mixes samples
    return AxisSoftmaxRule(layer == "log_softmax", axis - 1, 3 * out_numel)


_NORMALIZE_ARGUMENTS = ("p", "dim", "eps", "out")


def normalize_rule(node: fx.Node, x: torch.Tensor, out_numel) -> Optional[NodeRule]:
    """F.normalize(x, p=2, dim, eps) over a per-sample axis."""
    arguments = call_arguments(node, _NORMALIZE_ARGUMENTS)
    if arguments is None:
        return None
    p, dim, eps = arguments.get("p", 2.0), arguments.get("dim", 1), arguments.get("eps", 1e-12)
    if (arguments.get("out") is not None or not isinstance(p, (int, float)) or p != 2 or isinstance(dim, bool)
            or not isinstance(dim, int) or isinstance(eps, bool) or not isinstance(eps, (int, float))):
        return None
    axis = dim + x.dim() if dim < 0 else dim
    if not 0 < axis < x.dim():
        return None  # over the batch axis: mixes samples
    return NormalizeRule(axis, float(eps), 4 * out_numel)


_ATTENTION_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def attention_rule(node: fx.Node, values, inputs) -> Optional[NodeRule]:
    """F.scaled_dot_product_attention with every operand batch-first and of one rank (>= 3), a constant mask,
    no dropout and no grouped-query broadcasting."""
    arguments = call_arguments(node, _ATTENTION_ARGUMENTS, first=0)
    if arguments is None:
        return None
    operands = [arguments.get(name) for name in _ATTENTION_ARGUMENTS[:3]]
    if not all(isinstance(o, fx.Node) and isinstance(values[o], torch.Tensor) for o in operands):
        return None
    dims = {values[o].dim() for o in operands}
    mask = arguments.get("attn_mask")
    if len(dims) != 1 or min(dims) < 3 or (isinstance(mask, fx.Node) and mask in inputs):
        return None  # vectors, mixed ranks, or a mask that carries a derivative
    if isinstance(mask, fx.Node) and values[mask] is None:
        mask = None  # a model argument left at its default (timm's attn_mask=None)

    def constant(name, default):  # a flag may be a traced model argument, fixed at its default
        argument = arguments.get(name, default)
        return values[argument] if isinstance(argument, fx.Node) else argument

    if constant("dropout_p", 0.0) != 0.0 or constant("enable_gqa", False) is not False:
        return None
    causal, scale = constant("is_causal", False), constant("scale", None)
    if not isinstance(causal, bool) or not (scale is None or isinstance(scale, (int, float))):
        return None
    if mask is not None and not isinstance(mask, (fx.Node, torch.Tensor)):
        return None
    carried = tuple(o in inputs for o in operands)
    q, k, v = (values[o] for o in operands)
    out_numel = math.prod(values[node].shape[1:])
    work = 2 * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1]) * math.prod(q.shape[1:-2]) + out_numel
    return AttentionRule(tuple(operands), carried, mask, causal, scale, work)


def einsum_rule(node: fx.Node, values, inputs, batch_axes) -> Optional[NodeRule]:
    """torch.einsum with every carried operand's batch axis on one letter that the output keeps (anywhere in
    each: `batch_axes` says where, the values being stored batch-first). Left to the fallback: a letter repeated
    within one operand (a diagonal), and more letters than the 52 einsum knows once the ellipses and the rows
    are spelled out."""
    call = _einsum_call(node)
    if call is None:
        return None
    equation, operands = call
    tensors = [values[o] if isinstance(o, fx.Node) else o for o in operands]
    if not operands or not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    parsed = _einsum_letters(equation, [t.dim() for t in tensors])
    if parsed is None:
        return None
    letters, output = parsed
    carried = [isinstance(o, fx.Node) and o in inputs for o in operands]
    batch_letters = {spec[batch_axes.get(o, 0)] for spec, o, c in zip(letters, operands, carried) if c}
    if not output or batch_letters != {output[batch_axes.get(node, 0)]}:
        return None  # the batch summed over, or carried operands on different letters (mixing samples)
    batch = output[batch_axes.get(node, 0)]
    stored = [batch + spec.replace(batch, "") if c else spec for spec, c in zip(letters, carried)]
    output = batch + output.replace(batch, "")
    unused = [letter for letter in string.ascii_letters if letter not in output + "".join(stored)]
    sizes = {}
    for spec, tensor in zip(stored, tensors):
        for letter, size in zip(spec, tensor.shape):
            sizes[letter] = max(size, sizes.get(letter, 1))  # size-1 axes broadcast
    if not unused or tuple(sizes[letter] for letter in output) != tuple(values[node].shape):
        return None  # no letter left for the rows, or einsum read the equation otherwise than we did
    sizes[batch] = 1  # work per sample
    work = sum(carried) * 2 * _contraction_work(stored, output, sizes)
    return EinsumRule(operands, stored, output, carried, unused[0], work)


def _einsum_call(node: fx.Node) -> Optional[Tuple[str, list]]:
    """(equation, operands) of every call form: einsum(equation, *operands), einsum(equation, [operands]) and
    the sublist form einsum(a, [0, 1], b, [1, 2], [0, 2]) (axes as integers below 52, or Ellipsis)."""
    if node.kwargs or not node.args:
        return None
    if isinstance(node.args[0], str):
        operands = node.args[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = operands[0]
        return node.args[0], list(operands)
    paired = node.args[:len(node.args) // 2 * 2]
    sublists = [*paired[1::2], *node.args[len(paired):]]  # the output's sublist last, when given

    def spelled(sublist):
        if not isinstance(sublist, (list, tuple)) or not all(
                s is Ellipsis or isinstance(s, int) and 0 <= s < 52 for s in sublist):
            return None
        return "".join("..." if s is Ellipsis else string.ascii_letters[s] for s in sublist)

    specs = [spelled(s) for s in sublists]
    if any(spec is None for spec in specs):
        return None
    output = "->" + specs.pop() if len(node.args) % 2 else ""
    return ",".join(specs) + output, list(paired[0::2])


def _einsum_letters(equation: str, ndims: Sequence[int]) -> Optional[Tuple[List[str], str]]:
    """Each operand's letters and the output's (the implicit one when there is no '->': the ellipsis axes,
    then the letters used once, sorted), each '...' spelled out in letters of its own, aligned from the right
    as einsum broadcasts them; None for an equation we do not read (a repeated letter within one operand)."""
    equation = "".join(equation.split())
    left, arrow, output = equation.partition("->")
    specs = left.split(",")
    if len(specs) != len(ndims) or not set(equation) <= set(string.ascii_letters) | set(".,->"):
        return None
    if not arrow:
        once = sorted(letter for letter in set(left) if left.count(letter) == 1 and letter in string.ascii_letters)
        output = ("..." if "..." in left else "") + "".join(once)
    ellipsis_axes = [ndim - len(spec.replace("...", "")) for spec, ndim in zip(specs, ndims) if "..." in spec]
    spare = [letter for letter in string.ascii_letters if letter not in equation]
    if ellipsis_axes and (min(ellipsis_axes) < 0 or max(ellipsis_axes) > len(spare)):
        return None
    ellipsis = "".join(spare[:max(ellipsis_axes, default=0)])

    def spell(spec, axes):
        return spec.replace("...", ellipsis[len(ellipsis) - axes:], 1)

    letters = [spell(spec, ndim - len(spec.replace("...", ""))) for spec, ndim in zip(specs, ndims)]
    output = spell(output, len(ellipsis))
    if any(len(spec) != ndim or len(set(spec)) != len(spec) or not set(spec) <= set(string.ascii_letters)
           for spec, ndim in zip(letters, ndims)):
        return None  # a diagonal, a second ellipsis or a stray '.'
    if len(set(output)) != len(output) or not set(output) <= set("".join(letters)):
        return None
    return letters, output


def _contraction_work(letters: Sequence[str], output: str, sizes) -> int:
    """Multiply-adds of contracting the operands pairwise from the left: each step costs the product of the
    sizes of both sides' letters and keeps those still needed (exact for one product, an estimate beyond)."""
    current, work = letters[0], 0
    for position, spec in enumerate(letters[1:], 1):
        joined = set(current) | set(spec)
        work += math.prod(sizes[letter] for letter in joined)
        needed = set(output).union(*letters[position + 1:])
        current = "".join(joined & needed)
    return work or math.prod(sizes[letter] for letter in letters[0])  # one operand: a permutation or a sum
