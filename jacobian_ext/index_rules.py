"""Index maps: reshapes, permutes, roll / flip, constant padding, indexing, gather / index_select,
concatenation and split picks. They move or copy entries of a block without arithmetic, so each applies to
the block itself (views stay views); the batch axis may sit anywhere in the op's own layout
(Evaluator.batch_axes), and each rule is written against that layout as a map of the batch-first blocks."""
import operator
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx

from .program import entry
from .blocks import IDENTITY, NodeRule, Picked, call_arguments, explicit_block, node_arguments


class ShapeArgument:
    """An index map's argument (slice bounds, roll shifts, pad amounts) that may hold graph nodes computing
    integers from shapes alone (a window's padding from x.shape, _shape_arithmetic): one capture serves every
    input size, so their values are read at each call."""

    def __init__(self, argument):
        self.argument = argument
        self.traced = bool(_graph_nodes(argument))

    def at(self, env):
        return fx.node.map_arg(self.argument, env.__getitem__) if self.traced else self.argument

    def resolved(self, plan):
        """The argument's value for the plan's per-sample input shape (a plan, and its program, serve one), or
        None where it reads the batch size (the program serves every batch size) or cannot be told from the
        per-sample shapes alone."""
        if not self.traced:
            return self.argument
        values = shape_values(plan, _graph_nodes(self.argument))
        return None if values is None else fx.node.map_arg(self.argument, values.__getitem__)


class ReshapeRule(NodeRule):
    """Any op that keeps the row-major order of a sample's features (view, reshape, flatten,
    unflatten, squeeze, unsqueeze, contiguous, Identity, Dropout in eval mode): a view of the block."""

    label = "index map (reshape)"
    reverse_views = True

    def forward(self, plan, g, env, tangents):
        x = env[g.inputs[0]]
        value = plan.evaluator.evaluate(g.node, env)
        if tangents[0] is IDENTITY and tuple(x.shape[1:]) == g.shape:
            return value, IDENTITY
        tangent = explicit_block(tangents[0], x.shape[0], x.shape[1:], x)
        return value, tangent.reshape(x.shape[0], tangent.shape[1], *g.shape)

    def reverse(self, plan, g, env, cotangent):
        x = env[g.inputs[0]]
        if cotangent is IDENTITY and tuple(x.shape[1:]) == g.shape:
            return [IDENTITY]
        block = explicit_block(cotangent, x.shape[0], g.shape, x)
        return [block.reshape(x.shape[0], block.shape[1], *x.shape[1:])]

    def position_axes(self, plan, g):
        """The leading axes the input's shape and the node's share: row-major order keeps their positions."""
        shared = 0
        for before, after in zip(plan.shape_of(g.inputs[0]), g.shape):
            if before != after:
                break
            shared += 1
        return shared

    def encode(self, plan, g, sources):
        return [(entry("reshape", sources, shape=list(g.shape)), [])]


class PermuteRule(NodeRule):
    """permute / transpose / movedim of the per-sample axes: the same permutation of the block's
    axes, shifted past the rows axis (a view)."""

    label = "index map (permute)"
    reverse_views = True

    def __init__(self, permutation: Sequence[int], work_per_row: float):
        super().__init__(work_per_row)
        # permutation of [B, *shape] with 0 fixed -> of [B, R, *shape]
        self.block_permutation = [0, 1] + [p + 1 for p in permutation[1:]]
        self.inverse = [self.block_permutation.index(i) for i in range(len(self.block_permutation))]

    def forward(self, plan, g, env, tangents):
        x = env[g.inputs[0]]
        tangent = explicit_block(tangents[0], x.shape[0], x.shape[1:], x)
        return plan.evaluator.evaluate(g.node, env), tangent.permute(self.block_permutation)

    def reverse(self, plan, g, env, cotangent):
        x = env[g.inputs[0]]
        return [explicit_block(cotangent, x.shape[0], g.shape, x).permute(self.inverse)]

    def encode(self, plan, g, sources):
        return [(entry("permute", sources, dims=[p - 2 for p in self.block_permutation[2:]]), [])]


class ShiftRule(NodeRule):
    """torch.roll / torch.flip over per-sample axes: the same permutation of positions on the block's axes
    (shifted past the rows axis); reverse rolls back by the opposite shifts (a flip is its own inverse)."""

    label = "index map (roll/flip)"

    def __init__(self, block_dims: Sequence[int], shifts: Optional[Sequence], work_per_row: float):
        super().__init__(work_per_row)
        self.block_dims, self.shifts = list(block_dims), None if shifts is None else ShapeArgument(list(shifts))

    def _moved(self, block, env, inverse: bool):
        if self.shifts is None:
            return block.flip(self.block_dims)
        shifts = self.shifts.at(env)
        if not any(shifts):
            return block  # a shift computed as 0 (swin's, where one window covers the map)
        return block.roll([-s if inverse else s for s in shifts], self.block_dims)

    def forward(self, plan, g, env, tangents):
        x = env[g.inputs[0]]
        tangent = explicit_block(tangents[0], x.shape[0], x.shape[1:], x)
        return plan.evaluator.evaluate(g.node, env), self._moved(tangent, env, inverse=False)

    def reverse(self, plan, g, env, cotangent):
        x = env[g.inputs[0]]
        return [self._moved(explicit_block(cotangent, x.shape[0], g.shape, x), env, inverse=True)]

    def encode(self, plan, g, sources):
        dims = [d - 2 for d in self.block_dims]  # block axes to per-sample axes
        if self.shifts is None:
            return [(entry("flip", sources, dims=dims), [])]
        shifts = self.shifts.resolved(plan)
        if shifts is None:
            return None  # a shift read from the batch size: not one constant of the program
        if not any(shifts):  # swin's shift where one window covers the map: the value itself
            return [(entry("reshape", sources, shape=list(g.shape)), [])]
        return [(entry("roll", sources, shifts=shifts, dims=dims), [])]


class PadRule(NodeRule):
    """F.pad(x, pad) in constant mode over per-sample axes: the block padded the same way with zeros (the padding
    value is a constant); reverse pads by the opposite amounts, which crops the padding off (and puts zeros back
    where a negative amount cropped the input)."""

    label = "index map (pad)"

    def __init__(self, pad: Sequence, value, work_per_row: float):
        super().__init__(work_per_row)
        self.pad = ShapeArgument(list(pad))
        self.value = value  # the padding's value as F.pad was given it (None: 0)

    def forward(self, plan, g, env, tangents):
        x = env[g.inputs[0]]
        tangent = explicit_block(tangents[0], x.shape[0], x.shape[1:], x)
        return plan.evaluator.evaluate(g.node, env), F.pad(tangent, self.pad.at(env))

    def reverse(self, plan, g, env, cotangent):
        x = env[g.inputs[0]]
        block = explicit_block(cotangent, x.shape[0], g.shape, x)
        return [F.pad(block, [-amount for amount in self.pad.at(env)])]

    def encode(self, plan, g, sources):
        value = 0.0 if self.value is None else self.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None  # a padding value computed in the forward: not a number of the program
        pad = self.pad.resolved(plan)
        if pad is None:
            return None  # an amount read from the batch size: not one constant of the program
        return [(entry("pad", sources, pad=pad, value=float(value)), [])]


class IndexRule(NodeRule):
    """Basic slicing x[:, ...] that keeps the batch axis: the same index on the block (a view);
    reverse writes the cotangent into zeros of the input's shape."""

    label = "index map (slice)"

    def __init__(self, block_index: tuple, work_per_row: float):
        super().__init__(work_per_row)
        self.block_index = ShapeArgument(block_index)  # slice bounds may be computed from shapes (x[:, :H])

    def forward(self, plan, g, env, tangents):
        x = env[g.inputs[0]]
        tangent = explicit_block(tangents[0], x.shape[0], x.shape[1:], x)
        return plan.evaluator.evaluate(g.node, env), tangent[self.block_index.at(env)]

    def reverse(self, plan, g, env, cotangent):
        x = env[g.inputs[0]]
        block = explicit_block(cotangent, x.shape[0], g.shape, x)
        block_index = self.block_index.at(env)
        box = self._box(block_index, x.shape[1:])
        if box is not None:  # integers and unit-step slices: a Picked box, integer axes kept with size 1
            kept = [slice(None), slice(None)] + [slice(None) if isinstance(p, slice) else None
                                                 for p in block_index[2:]]
            return [Picked(box, block[tuple(kept)], x.shape[1:])]
        pulled = block.new_zeros(x.shape[0], block.shape[1], *x.shape[1:])
        pulled[block_index] = block
        return [pulled]

    @staticmethod
    def _box(block_index: tuple, shape) -> Optional[List[slice]]:
        """The index as one unit-step slice per indexed per-sample axis, or None (a new axis, another step)."""
        parts = block_index[2:]
        if len(parts) > len(shape):  # new axes (None) among the parts
            return None
        box = []
        for part, size in zip(parts, shape):
            if isinstance(part, int):
                box.append(slice(part % size, part % size + 1))
            elif isinstance(part, slice) and part.indices(size)[2] == 1:
                start, stop, _ = part.indices(size)
                box.append(slice(start, max(start, stop)))
            else:
                return None
        return box

    def encode(self, plan, g, sources):
        """One `slice` entry per sliced per-sample axis (an integer as a slice of one position), then a reshape
        where integers drop axes or None inserts them."""
        block_index = self.block_index.resolved(plan)
        if block_index is None:
            return None  # a bound read from the batch size: not one constant of the program
        input_shape = plan.shape_of(g.inputs[0])
        entries, sliced = [], list(input_shape)
        axis = 0
        for part in block_index[2:]:
            if part is None:
                continue
            size = input_shape[axis]
            start, stop, step = (part % size, part % size + 1, 1) if isinstance(part, int) else part.indices(size)
            if step < 1:
                return None  # tensors take no negative step; the slice kind needs start <= stop
            stop = max(stop, start)
            if (start, stop, step) != (0, size, 1):
                entries.append((entry("slice", sources if not entries else (), dim=axis, start=start, stop=stop,
                                      step=step), []))
                sliced[axis] = len(range(start, stop, step))
            axis += 1
        if not entries or tuple(sliced) != tuple(g.shape):
            entries.append((entry("reshape", sources if not entries else (), shape=list(g.shape)), []))
        return entries


class SelectionRule(NodeRule):
    """x.gather(dim, index) / x.index_select(dim, index) along a per-sample axis, the index carrying no
    derivative (a buffer, a constant, or argmax indices): the same selection of the block's positions, the
    index broadcast over the rows axis (forward); reverse adds each cotangent position back where it was read
    from (scatter_add / index_add into zeros: a position read twice gets both, one never read gets zero)."""

    def __init__(self, gather: bool, dim: int, index: fx.Node, program_index: Optional[fx.Node],
                 work_per_row: float):
        super().__init__(work_per_row)
        self.gather, self.dim, self.index = gather, dim, index  # dim: an axis of [B, *shape], not 0
        self.program_index = program_index  # the get_attr node the program reads the index from, or None
        self.label = f"index map ({'gather' if gather else 'index_select'})"

    def _block_index(self, env, rows: int) -> torch.Tensor:
        index = env[self.index]
        if not self.gather:
            return index.reshape(-1)  # one number selects one position and keeps the axis, as index_select does
        return index.unsqueeze(1).expand(index.shape[0], rows, *index.shape[1:])

    def forward(self, plan, g, env, tangents):
        x = env[g.inputs[0]]
        tangent = explicit_block(tangents[0], x.shape[0], x.shape[1:], x)
        index = self._block_index(env, tangent.shape[1])
        selected = tangent.gather(self.dim + 1, index) if self.gather else tangent.index_select(self.dim + 1, index)
        return plan.evaluator.evaluate(g.node, env), selected

    def reverse(self, plan, g, env, cotangent):
        x = env[g.inputs[0]]
        block = explicit_block(cotangent, x.shape[0], g.shape, x)
        index = self._block_index(env, block.shape[1])
        pulled = block.new_zeros(x.shape[0], block.shape[1], *x.shape[1:])
        if self.gather:
            return [pulled.scatter_add_(self.dim + 1, index, block)]
        return [pulled.index_add_(self.dim + 1, index, block)]

    def encode(self, plan, g, sources):
        if self.program_index is None:
            return None  # an index computed in the forward: not a tensor the program can read from the model
        kind = "gather" if self.gather else "index_select"
        return [(entry(kind, sources, dim=self.dim - 1), [attribute_getter(plan, self.program_index)])]


class CatRule(NodeRule):
    """torch.cat along a per-sample axis: the blocks concatenated along the same axis (zeros for the
    parts that carry no derivative); reverse splits the cotangent."""

    label = "index map (cat)"

    def __init__(self, block_dim: int, parts: Sequence[Optional[fx.Node]], work_per_row: float):
        super().__init__(work_per_row)
        self.block_dim = block_dim
        self.parts = list(parts)  # the fx node of each concatenated tensor, or None when constant

    def forward(self, plan, g, env, tangents):
        value = plan.evaluator.evaluate(g.node, env)
        by_input = dict(zip(g.inputs, tangents))
        blocks = []
        for part, part_value in zip(self.parts, self._part_values(plan, g, env)):
            if part is not None:
                blocks.append(explicit_block(by_input[part], value.shape[0], part_value.shape[1:], part_value))
            else:
                blocks.append(part_value.new_zeros(value.shape[0], plan.in_features, *part_value.shape[1:]))
        return value, torch.cat(blocks, self.block_dim)

    def _part_values(self, plan, g, env):
        args, kwargs = node_arguments(plan, g.node, env)
        return list(args[0] if args else kwargs["tensors"])

    def reverse(self, plan, g, env, cotangent):
        value = env[g.node]
        block = explicit_block(cotangent, value.shape[0], g.shape, value)
        sizes = [v.shape[self.block_dim - 1] for v in self._part_values(plan, g, env)]
        pieces = torch.split(block, sizes, dim=self.block_dim)
        by_part = {}
        for part, piece in zip(self.parts, pieces):
            if part is not None:
                by_part[part] = piece if part not in by_part else by_part[part] + piece
        return [by_part[i] for i in g.inputs]

    def encode(self, plan, g, sources):
        args, kwargs = g.node.args, g.node.kwargs
        flags, getters = [], []
        for part, tensor in zip(self.parts, args[0] if args else kwargs["tensors"]):
            parameter = None if part is not None else _batch_expanded_parameter(plan, tensor)
            if part is None and parameter is None:
                return None  # a constant computed otherwise: not a tensor the program can read from the model
            flags.append(int(part is None))
            getters += [attribute_getter(plan, parameter)] if parameter is not None else []
        attributes = {"dim": self.block_dim - 2}
        if any(flags):
            attributes["constants"] = flags
        return [(entry("cat", [plan.slot_of(part) for part in self.parts if part is not None], **attributes), getters)]


def _batch_expanded_parameter(plan, node) -> Optional[fx.Node]:
    """The get_attr node of a part `p.expand(B, -1, ...)` whose parameter p has batch 1 and whose expand changes
    nothing but the batch (timm's and torchvision's class token), else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "expand" and not node.kwargs
            and len(node.args) >= 2 and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"):
        return None
    parameter = attribute_getter(plan, node.args[0])()
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    if parameter.dim() != len(sizes) or parameter.shape[0] != 1:
        return None
    if not all(size == -1 or size == kept for size, kept in zip(sizes[1:], parameter.shape[1:])):
        return None
    return node.args[0]


def attribute_getter(plan, node: fx.Node) -> Callable:
    """Reads a get_attr node's tensor (a parameter or buffer) at call time."""
    return lambda: plan.evaluator.call(node, (), {})


RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "contiguous", "view_as", "reshape_as"}


RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten}


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def layout_rule(node: fx.Node, values, inputs, batch_axes: Dict[fx.Node, int], out_numel) -> Optional[NodeRule]:
    """permute / transpose and basic indexing, written against the layout their op sees (the batch axis
    where batch_axes says, else first), as maps of the batch-first blocks."""
    if len(inputs) != 1 or not node.args or node.args[0] is not inputs[0]:
        return None
    x_node = inputs[0]
    if not isinstance(values[x_node], torch.Tensor):
        return None  # a pick from a multi-output node
    ndim, x_axis, out_axis = values[x_node].dim(), batch_axes.get(x_node, 0), batch_axes.get(node, 0)
    if node.target in _PERMUTES:
        return _permute_rule(node, ndim, x_axis, out_axis, out_numel)
    if node.target is operator.getitem:
        return _index_rule(node.args[1], values, ndim, x_axis, out_numel)
    if node.target in ("roll", torch.roll, "flip", torch.flip) and out_axis == x_axis:
        return _shift_rule(node, values, ndim, x_axis, out_numel)
    return None


def _graph_nodes(argument) -> List[fx.Node]:
    found = []
    fx.node.map_arg(argument, found.append)
    return found


def _shape_arithmetic(argument, values) -> bool:
    """Whether every graph node in an argument is an integer computed from shapes and constants alone
    (_reads_no_samples): the same for every sample, so the map it parameterises is one per-sample map."""
    return all(isinstance(values[n], int) and not isinstance(values[n], bool) and _reads_no_samples(n)
               for n in _graph_nodes(argument))


def _shift_rule(node: fx.Node, values, ndim: int, x_axis: int, out_numel) -> Optional[NodeRule]:
    """roll(x, shifts, dims) with explicit dims (none: a roll of the flattened tensor, batch included) and
    flip(x, dims), over per-sample axes."""
    roll = node.target in ("roll", torch.roll)
    arguments = call_arguments(node, ("shifts", "dims") if roll else ("dims",))
    if arguments is None:
        return None
    as_list = lambda v: list(v) if isinstance(v, (tuple, list)) else [v]  # noqa: E731
    dims = as_list(arguments.get("dims"))
    shifts = as_list(arguments.get("shifts")) if roll else None
    if not all(isinstance(d, int) for d in dims) or (roll and (
            not all(isinstance(s, (int, fx.Node)) for s in shifts) or not _shape_arithmetic(shifts, values)
            or len(shifts) != len(dims))):
        return None
    dims = [normalize_dim(d, ndim) for d in dims]
    if not dims or x_axis in dims:
        return None  # moves samples
    return ShiftRule([_batch_first_position(d, x_axis) + 1 for d in dims], shifts, out_numel)


def _batch_first_position(axis: int, batch_axis: int) -> int:
    """Where an axis of a value whose batch axis is batch_axis lands once that axis is moved first."""
    return 0 if axis == batch_axis else axis + 1 if axis < batch_axis else axis


_SWAPS = {"transpose", torch.transpose, "swapaxes", torch.swapaxes, "swapdims", torch.swapdims}


_MOVES = {"movedim", torch.movedim, "moveaxis", torch.moveaxis}


_PERMUTES = _SWAPS | _MOVES | {"permute", torch.permute}


def _permute_rule(node: fx.Node, ndim: int, x_axis: int, out_axis: int, out_numel) -> Optional[NodeRule]:
    args, traced = node.args[1:], []
    fx.node.map_arg(args, traced.append)
    if traced or node.kwargs:  # an axis computed in the graph
        return None
    if node.target in _SWAPS:
        first, second = (normalize_dim(d, ndim) for d in args)
        permutation = list(range(ndim))
        permutation[first], permutation[second] = second, first
    elif node.target in _MOVES:
        # Output axis k is input axis permutation[k]: read off a meta tensor whose sizes name its axes.
        moved = torch.empty([axis + 2 for axis in range(ndim)], device="meta").movedim(*args)
        permutation = [size - 2 for size in moved.shape]
    else:
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        permutation = [normalize_dim(d, ndim) for d in dims]
    if len(permutation) != ndim or permutation[out_axis] != x_axis:
        return None  # the probe says otherwise: leave the node to the fallback
    # Output axis m of the batch-first output is axis order[m] of the op's output, i.e. axis
    # permutation[order[m]] of the op's input, which sits at _batch_first_position(...) of the stored input.
    order = [out_axis] + [axis for axis in range(ndim) if axis != out_axis]
    return PermuteRule([_batch_first_position(permutation[m], x_axis) for m in order], out_numel)


def _index_rule(index, values, ndim: int, x_axis: int, out_numel) -> Optional[NodeRule]:
    """Integers, slices (their bounds constants or computed from shapes), None and one Ellipsis, the batch axis
    taken whole: the same index on the block, whose rows axis is taken whole too."""
    parts = index if isinstance(index, tuple) else (index,)
    if any(isinstance(p, bool) or not isinstance(p, (int, slice)) and p is not Ellipsis and p is not None
           for p in parts) or parts.count(Ellipsis) > 1:
        return None  # advanced indexing, a computed index: fallback
    if not _shape_arithmetic(parts, values):
        return None
    consumed = sum(p is not None and p is not Ellipsis for p in parts)  # input axes the index names
    if consumed > ndim:
        return None
    at = parts.index(Ellipsis) if Ellipsis in parts else len(parts)  # trailing axes: an implicit Ellipsis
    parts = parts[:at] + (slice(None),) * (ndim - consumed) + parts[at + 1:]
    axis_of_part = [None] * len(parts)  # which input axis each part indexes (None inserts one)
    axis = 0
    for position, part in enumerate(parts):
        if part is not None:
            axis_of_part[position], axis = axis, axis + 1
    batch_part = axis_of_part.index(x_axis)
    if parts[batch_part] != slice(None):
        return None  # indexes the batch axis
    if any(p is None for p in parts[:batch_part]):
        return None  # a new axis ahead of the batch: the output's batch axis moves; leave it to the fallback
    per_sample = parts[:batch_part] + parts[batch_part + 1:]
    return IndexRule((slice(None), slice(None), *per_sample), out_numel)


_SPLITS = {"unbind": 1, torch.unbind: 1, "chunk": 2, torch.chunk: 2, "split": 2, torch.split: 2,
           "tensor_split": 2, torch.tensor_split: 2}  # each producer's position of its dim argument


def split_pick_rule(node: fx.Node, values, carries, batch_axes: Dict[fx.Node, int],
                     out_numel) -> Optional[Tuple[NodeRule, List]]:
    """A part of x picked from unbind / chunk / split / tensor_split along a per-sample axis (q, k, v =
    qkv.unbind(0); shufflenet's x.chunk(2, dim=1)): an index of x's block, the part's offset and size read
    from the probe (they do not depend on the batch size)."""
    producer, pick = node.args
    if not (isinstance(producer, fx.Node) and isinstance(pick, int) and producer.op in ("call_function", "call_method")
            and producer.target in _SPLITS and isinstance(values[producer], (tuple, list))):
        return None
    x_node = producer.args[0] if producer.args else None
    if not (isinstance(x_node, fx.Node) and carries.get(x_node, False) and isinstance(values[x_node], torch.Tensor)):
        return None
    dim_position = _SPLITS[producer.target]
    if set(producer.kwargs) - {"dim"} or len(producer.args) > dim_position + 1:
        return None
    dim = producer.args[dim_position] if len(producer.args) > dim_position else producer.kwargs.get("dim", 0)
    if not isinstance(dim, int):
        return None
    parts = values[producer]
    ndim, x_axis = values[x_node].dim(), batch_axes.get(x_node, 0)
    dim = normalize_dim(dim, ndim)
    if dim == x_axis or not -len(parts) <= pick < len(parts):
        return None
    pick %= len(parts)
    position = _batch_first_position(dim, x_axis)
    if producer.target in ("unbind", torch.unbind):
        index = pick
    else:
        offset = sum(part.shape[dim] for part in parts[:pick])
        index = slice(offset, offset + parts[pick].shape[dim])
    return IndexRule((slice(None),) * (position + 1) + (index,), out_numel), [x_node]


# Each selection's target, and whether it is gather (True) or index_select (False).
_SELECTIONS = {torch.gather: True, "gather": True, torch.index_select: False, "index_select": False}


_ARG_EXTREMA = {torch.argmax, "argmax", torch.argmin, "argmin"}


def selection_rule(node: fx.Node, values, inputs, carries, batch_axes, out_numel) -> Optional[NodeRule]:
    """gather / index_select of the one carried value along a per-sample axis, with an index that cannot carry
    samples into one another: computed without reading any sample (_reads_no_samples) or argmax / argmin over a
    per-sample axis of a value the probe checked (_per_sample_extremum). Any other index and the batch axis are
    left to the fallback (rule_for sends a node whose batch axis moved to the layout rules, which have none)."""
    if node.op not in ("call_function", "call_method") or node.target not in _SELECTIONS or len(inputs) != 1:
        return None
    gather = _SELECTIONS[node.target]
    if not node.args or node.args[0] is not inputs[0]:
        return None
    arguments = call_arguments(node, ("dim", "index", "sparse_grad") if gather else ("dim", "index"))
    if arguments is None:
        return None
    dim, index = arguments.get("dim"), arguments.get("index")
    if (arguments.get("sparse_grad", False) is not False or not isinstance(dim, int) or isinstance(dim, bool)
            or not isinstance(index, fx.Node)):
        return None
    dim = normalize_dim(dim, values[inputs[0]].dim())
    if dim == 0:
        return None  # selects samples
    if not (_reads_no_samples(index) or _per_sample_extremum(index, values, carries, batch_axes)):
        return None
    return SelectionRule(gather, dim, index, _program_index(index, values, gather), out_numel)


def _reads_no_samples(node: fx.Node) -> bool:
    """Whether a value is computed from parameters, buffers and constants alone, reading at most the input's
    shape (x.size(0), x.shape): the same for every sample, a constant of the derivative."""
    pending, seen = [node], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            return False
        if _is_shape_query(current):
            continue
        pending += current.all_input_nodes
    return True


def _is_shape_query(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in ("size", "dim")
            or node.op == "call_function" and node.target is getattr and len(node.args) == 2
            and node.args[1] in ("shape", "ndim", "dtype", "device"))


def shape_values(plan, nodes: Sequence[fx.Node]) -> Optional[Dict[fx.Node, object]]:
    """The values of graph nodes computed from shapes and constants for the plan's per-sample input shape, or None
    where they read the batch size or a sample's values (_shape_subgraph), or fail on the stand-ins."""
    subgraph = _shape_subgraph(plan, nodes)
    return None if subgraph is None else _evaluated_or_none(plan, subgraph)


def _evaluated_or_none(plan, subgraph) -> Optional[Dict[fx.Node, object]]:
    try:
        return _evaluate_subgraph(plan, *subgraph)
    except Exception:  # noqa: BLE001  (an op that needs a sample's values): no constant for the program
        return None


def constant_getter(plan, node) -> Optional[Callable]:
    """A getter, for a program's params, of a tensor operand that carries no derivative: a parameter or buffer
    (get_attr) read as it is, or a tensor computed from those, constants and the per-sample shapes of carried
    values (swin's relative position bias and shifted-window mask, V2's logit scale), recomputed at every call
    as the walker does; None for anything else (a tensor reading the batch size or a sample's values)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return attribute_getter(plan, node)
    subgraph = _shape_subgraph(plan, [node])
    values = None if subgraph is None else _evaluated_or_none(plan, subgraph)
    if values is None or not isinstance(values.get(node), torch.Tensor):
        return None  # (not in values: a carried value, which is no constant)
    def computed():
        return _evaluate_subgraph(plan, *subgraph)[node]

    computed.computed_constant = True  # deploy.py: no parameter of the model to read by name
    return computed


def _shape_subgraph(plan, nodes: Sequence[fx.Node]):
    """(the value-only nodes that `nodes` are computed from, in graph order; the carried values among their
    inputs, with their per-sample shapes), or None where those nodes read more of a carried value than the sizes
    of its per-sample axes (_reads_sample_axes)."""
    carried = {plan.input_node: plan.input_shape}
    carried.update((g.node, g.shape) for g in plan.nodes if g.rule is not None or g.node in plan.absorbed)
    needed, pending, read = set(), list(nodes), {}
    while pending:
        node = pending.pop()
        if node not in needed and node not in carried:
            needed.add(node)
            pending += node.all_input_nodes
    for node in needed:
        for source in node.all_input_nodes:
            if source in carried:
                if not _reads_sample_axes(node, source, len(carried[source]) + 1,
                                          plan.evaluator.batch_axes.get(source, 0), needed):
                    return None
                read[source] = carried[source]
    return [node for node in plan.gm.graph.nodes if node in needed], read


def _evaluate_subgraph(plan, order: List[fx.Node], read: Dict[fx.Node, Tuple[int, ...]]) -> Dict:
    """The values of a _shape_subgraph's nodes, each carried value it reads standing in as a tensor of one sample
    of its planned shape (expanded from one element: no memory) of the plan's dtype and device."""
    env = {node: torch.empty((), dtype=plan.dtype, device=plan.device).expand(1, *shape)
           for node, shape in read.items()}
    for node in order:
        # a placeholder here is an optional model argument: its default (graph.placeholder_default)
        env[node] = (node.args[0] if node.args else None) if node.op == "placeholder" else \
            plan.evaluator.evaluate(node, env)
    return env


def _reads_sample_axes(query: fx.Node, source: fx.Node, ndim: int, batch_axis: int, needed) -> bool:
    """Whether a node reading a carried value reads only sizes of its per-sample axes (not the batch size):
    x.size(d), x.dim(), x.ndim, x.dtype, x.device, or x.shape / x.size() whose every reader that matters picks
    per-sample axes (x.shape[1], x.shape[1:3])."""
    if not _is_shape_query(query) or query.args[0] is not source:
        return False
    if query.op == "call_method" and query.target == "size" and len(query.args) > 1:
        dim = query.args[1]
        return isinstance(dim, int) and not isinstance(dim, bool) and normalize_dim(dim, ndim) != batch_axis
    whole = query.op == "call_method" and query.target == "size" or query.target is getattr and query.args[1] == "shape"
    if not whole:
        return True  # dim, ndim, dtype, device
    for reader in query.users:
        if reader not in needed:
            continue
        if reader.op != "call_function" or reader.target is not operator.getitem or reader.args[0] is not query:
            return False
        pick = reader.args[1]
        if isinstance(pick, bool) or not isinstance(pick, (int, slice)):
            return False
        picked = range(ndim)[pick]
        if batch_axis in (picked if isinstance(picked, range) else [picked]):
            return False
    return True


def _per_sample_extremum(node: fx.Node, values, carries, batch_axes) -> bool:
    """argmax / argmin(v, dim, keepdim=True) over a per-sample axis of a batch-first value v that the probe
    checked maps samples on their own (a carried value): per-sample indices, piecewise constant in x."""
    if node.op not in ("call_function", "call_method") or node.target not in _ARG_EXTREMA or not node.args:
        return False
    arguments = call_arguments(node, ("dim", "keepdim"))
    if arguments is None:
        return False
    source, dim = node.args[0], arguments.get("dim")
    if not (isinstance(source, fx.Node) and carries.get(source, False) and source not in batch_axes
            and isinstance(values[source], torch.Tensor) and isinstance(dim, int) and not isinstance(dim, bool)
            and arguments.get("keepdim") is True):
        return False
    return normalize_dim(dim, values[source].dim()) != 0


def _program_index(index: fx.Node, values, gather: bool) -> Optional[fx.Node]:
    """The parameter or buffer (get_attr) a program reads the index from: the index itself, or for gather the
    batch-1 tensor the model expands over the batch (expand / expand_as changing nothing else); None otherwise."""
    if index.op == "get_attr":
        return index
    if not gather or index.op != "call_method" or index.target not in ("expand", "expand_as"):
        return None
    source = index.args[0]
    if not (isinstance(source, fx.Node) and source.op == "get_attr"
            and isinstance(values.get(source), torch.Tensor)):
        return None
    base, expanded = values[source], values[index]
    if base.dim() != expanded.dim() or base.shape[0] != 1 or base.shape[1:] != expanded.shape[1:]:
        return None
    return source


def pad_rule(node: fx.Node, values, out_numel) -> Optional[NodeRule]:
    """F.pad(x, pad, "constant", value) over per-sample axes, the amounts constants or computed from shapes."""
    arguments = call_arguments(node, ("pad", "mode", "value"))
    if arguments is None:
        return None
    pad = arguments.get("pad")
    if arguments.get("mode", "constant") != "constant" or not isinstance(pad, (tuple, list)) or len(pad) % 2:
        return None  # the other modes fill the padding with copies of the input, not a constant
    if len(pad) // 2 >= values[node.args[0]].dim():
        return None  # pads the batch axis
    if not all(isinstance(p, (int, fx.Node)) and not isinstance(p, bool) for p in pad) or not _shape_arithmetic(pad, values):
        return None
    return PadRule(pad, arguments.get("value"), out_numel)


def cat_rule(node: fx.Node, values, inputs, out_numel) -> Optional[NodeRule]:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or isinstance(dim, fx.Node):
        return None
    ndim = values[node].dim()
    dim = normalize_dim(dim, ndim)
    if dim == 0:
        return None
    parts = [t if isinstance(t, fx.Node) and t in inputs else None for t in tensors]
    return CatRule(dim + 1, parts, out_numel)
