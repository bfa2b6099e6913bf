"""Jacobian blocks as the graph rules pass them, and the base of those rules.

Blocks keep a node's per-sample shape intact and put the rows second: tangents T[b, d, *shape], cotangents
G[b, c, *shape]; IDENTITY stands for the lazy identity seed (the model input in forward mode, the model
output in reverse mode), and a Picked cotangent for one that is zero outside a box of positions.
"""
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx


class _Identity:
    def __repr__(self):
        return "IDENTITY"


IDENTITY = _Identity()


class Picked:
    """A cotangent [B, R, *shape] that is zero outside a box of positions: the reverse of a pick (x[:, 0], a
    part of unbind / chunk) kept lazy instead of written into zeros of the picked value's shape. A node that
    maps some leading axes position by position (NodeRule.position_axes) pulls it back on the box alone, so
    a head reading the class token runs the last block's norms and MLP on that token's rows only; parts of
    one value picked side by side (q, k, v of qkv.unbind) join into one box, their blocks kept apart until a
    rule needs the box's block, which is then written part by part (no concatenation, no zeros), laid out in
    memory like the value where the box is all of it.

    box: one slice (step 1, bounds in range) per leading per-sample axis, the axes after it taken whole;
    block: [B, R, *box sizes, *remaining axes]; parts: disjoint (box, block) pairs tiling the box."""

    def __init__(self, box: Sequence[slice], block: Optional[torch.Tensor], shape: Sequence[int],
                 parts: Optional[List[Tuple[Tuple[slice, ...], torch.Tensor]]] = None):
        self.box, self.shape = tuple(box), tuple(shape)
        self.parts = parts if parts is not None else [(self.box, block)]
        self._block = block

    @property
    def block(self) -> torch.Tensor:
        if self._block is None:
            self._block = self._assembled(None)
        return self._block

    def within(self, axes: int) -> bool:
        """Whether the box restricts only the first `axes` per-sample axes."""
        return all(part == slice(0, size) for part, size in zip(self.box[axes:], self.shape[axes:]))

    def dense(self, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The block over the whole value [B, R, *shape]; where the box is all of it, laid out in memory like
        `like` (the value, [B, *shape]) when given: a view the value was made by (qkv.permute) then undoes to
        a contiguous block."""
        if self.within(0):
            return self.block if self._block is not None or like is None else self._assembled(like)
        full = self.parts[0][1].new_zeros(*self.parts[0][1].shape[:2], *self.shape)
        for box, block in self.parts:
            full[(slice(None), slice(None), *box)] = block
        return full

    def added_to(self, block: torch.Tensor) -> torch.Tensor:
        """A dense block plus this one, as a fresh tensor (the dense block may be shared by other nodes)."""
        total = block.clone()
        for box, part in self.parts:
            total[(slice(None), slice(None), *box)] += part
        return total

    def _assembled(self, like: Optional[torch.Tensor]) -> torch.Tensor:
        first = self.parts[0][1]
        if len(self.parts) == 1:
            return first
        sizes = [part.stop - part.start for part in self.box] + list(self.shape[len(self.box):])
        batch, rows = first.shape[:2]
        out = (empty_block_like(like, rows) if like is not None
               else first.new_empty(batch, rows, *sizes))
        for box, block in self.parts:
            within = [slice(part.start - whole.start, part.stop - whole.start) for part, whole in zip(box, self.box)]
            out[(slice(None), slice(None), *within)] = block
        return out

    def joined(self, other: "Picked") -> Optional["Picked"]:
        """The sum with a pick of the same value, still lazy where the boxes are equal or are neighbours along
        one axis (the parts of both); None otherwise."""
        if self.shape != other.shape or len(self.box) != len(other.box):
            return None
        differing = [axis for axis, (a, b) in enumerate(zip(self.box, other.box)) if a != b]
        if not differing:
            return Picked(self.box, self.block + other.block, self.shape)
        if len(differing) > 1:
            return None
        axis = differing[0]
        first, second = sorted((self, other), key=lambda p: p.box[axis].start)
        if first.box[axis].stop != second.box[axis].start:
            return None
        box = list(first.box)
        box[axis] = slice(first.box[axis].start, second.box[axis].stop)
        return Picked(box, None, self.shape, first.parts + second.parts)


def empty_block_like(value: torch.Tensor, rows: int) -> torch.Tensor:
    """An uninitialised block [B, rows, *shape] for a value [B, *shape], its per-sample axes in the memory order
    of the value's (by decreasing stride), after the batch and rows axes."""
    order = sorted(range(1, value.dim()), key=lambda axis: -value.stride(axis))
    stored = value.new_empty(value.shape[0], rows, *[value.shape[axis] for axis in order])
    return stored.permute(0, 1, *[2 + order.index(axis) for axis in range(1, value.dim())])


def explicit_block(block, batch: int, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """The block as a tensor [B, R, *shape]; the identity becomes eye(R) expanded over the batch
    (R = prod(shape)), one copy for all samples; a Picked block its zeros with the box written."""
    if isinstance(block, Picked):
        return block.dense()
    if block is not IDENTITY:
        return block
    rows = math.prod(shape)
    eye = torch.eye(rows, dtype=like.dtype, device=like.device)
    return eye.reshape(1, rows, *shape).expand(batch, rows, *shape)


def accumulate(store: Dict, node, block, value: torch.Tensor):
    """Adds a cotangent contribution (fan-out: a value used by several nodes). `value` is the node's value
    [B, *shape]: it sizes the identity when both contributions are the lazy identity (the output is
    e.g. (x + 1) + x)."""
    if node not in store:
        store[node] = block
        return
    previous = store[node]
    if isinstance(previous, Picked) and isinstance(block, Picked):
        joined = previous.joined(block)
        if joined is not None:
            store[node] = joined
            return
    batch, shape = value.shape[0], value.shape[1:]
    if isinstance(block, Picked) or isinstance(previous, Picked):
        picked, other = (block, previous) if isinstance(block, Picked) else (previous, block)
        store[node] = picked.added_to(explicit_block(other, batch, shape, value))
        return
    store[node] = explicit_block(previous, batch, shape, value) + explicit_block(block, batch, shape, value)


class NodeRule:
    """Base of all node rules. forward: (value, tangent) from the input values and tangents;
    reverse: one cotangent per input node, from the node's cotangent."""

    label = "native"
    native = True
    # What reverse returns, for GraphPlan.owns_cotangent: blocks it allocated, which nothing else holds (a
    # product, a native op), or views of the cotangent it was given (an index map); neither by default.
    reverse_allocates = False
    reverse_views = False

    def __init__(self, work_per_row: float):
        self.work_per_row = float(work_per_row)  # multiply-adds per block row, for the cost model

    def forward(self, plan, g, env, tangents):
        raise NotImplementedError

    def reverse(self, plan, g, env, cotangent):
        raise NotImplementedError

    def position_axes(self, plan, g) -> int:
        """How many leading per-sample axes the node maps position by position (each output position is
        computed from its inputs at that position alone: all axes for an activation or a sum, all but the
        last for a Linear over tokens): a Picked cotangent boxed within them is pulled back on the box."""
        return 0

    def encode(self, plan, g, sources: Sequence[int]) -> Optional[List[Tuple[str, List[Callable]]]]:
        """The node as entries of the op's graph program (program.py): [(entry, parameter getters)], the
        first entry reading the value slots `sources` (empty: the previous slot), each later one the entry
        before it; None when the node has no encoding (it keeps the model off the single-op path)."""
        return None


def call_arguments(node, names: Sequence[str], first: int = 1) -> Optional[Dict]:
    """A call node's arguments by name: node.args[first:] in the order of `names`, and its keyword arguments;
    None when it passes more positional arguments than `names` or a keyword not among them (a signature the
    rule does not read)."""
    if len(node.args) > first + len(names) or set(node.kwargs) - set(names):
        return None
    return dict(zip(names, node.args[first:]), **node.kwargs)


def node_arguments(plan, node: fx.Node, env, substitute: Optional[Dict] = None):
    """A node's (args, kwargs) with its input nodes' values from env (or from substitute first), as the
    plan's evaluator hands them to the node's op."""
    lookup = (lambda a: substitute[a] if a in substitute else env[a]) if substitute else env.__getitem__
    return plan.evaluator.arguments(node, lookup)
