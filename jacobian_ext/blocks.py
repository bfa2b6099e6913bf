"""Jacobian blocks as the graph rules pass them, and the base of those rules.

Blocks keep a node's per-sample shape intact and put the rows second: tangents T[b, d, *shape], cotangents
G[b, c, *shape]; IDENTITY stands for the lazy identity seed (the model input in forward mode, the model
output in reverse mode), and a Picked cotangent for one that is zero outside a box of positions.
"""
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


class _Identity:
    def __repr__(self):
        return "IDENTITY"


IDENTITY = _Identity()


class Picked:
    """A cotangent [B, R, *shape] that is zero outside a box of positions: the reverse of a pick (x[:, 0], a
    part of unbind / chunk) kept lazy instead of written into zeros of the picked value's shape. A node that
    maps some leading axes position by position (NodeRule.position_axes) pulls it back on the box alone, so
    a head reading the class token runs the last block's norms and MLP on that token's rows only; parts of
    one value picked side by side (q, k, v of qkv.unbind) join into one block without the zeros.

    box: one slice (step 1, bounds in range) per leading per-sample axis, the axes after it taken whole;
    block: [B, R, *box sizes, *remaining axes]."""

    def __init__(self, box: Sequence[slice], block: torch.Tensor, shape: Sequence[int]):
        self.box, self.block, self.shape = tuple(box), block, tuple(shape)

    def within(self, axes: int) -> bool:
        """Whether the box restricts only the first `axes` per-sample axes."""
        return all(part == slice(0, size) for part, size in zip(self.box[axes:], self.shape[axes:]))

    def dense(self) -> torch.Tensor:
        if self.within(0):
            return self.block
        full = self.block.new_zeros(*self.block.shape[:2], *self.shape)
        full[(slice(None), slice(None), *self.box)] = self.block
        return full

    def added_to(self, block: torch.Tensor) -> torch.Tensor:
        """A dense block plus this one, as a fresh tensor (the dense block may be shared by other nodes)."""
        total = block.clone()
        total[(slice(None), slice(None), *self.box)] += self.block
        return total

    def joined(self, other: "Picked") -> Optional["Picked"]:
        """The sum with a pick of the same value, still lazy where the boxes are equal or are neighbours along
        one axis (concatenated); None otherwise."""
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
        return Picked(box, torch.cat([first.block, second.block], dim=2 + axis), self.shape)


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
