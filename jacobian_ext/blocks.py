"""Jacobian blocks as the graph rules pass them, and the base of those rules.

Blocks keep a node's per-sample shape intact and put the rows second: tangents T[b, d, *shape], cotangents
G[b, c, *shape]; IDENTITY stands for the lazy identity seed (the model input in forward mode, the model
output in reverse mode).
"""
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


class _Identity:
    def __repr__(self):
        return "IDENTITY"


IDENTITY = _Identity()


def explicit_block(block, batch: int, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """The block as a tensor [B, R, *shape]; the identity becomes eye(R) expanded over the batch
    (R = prod(shape)), one copy for all samples."""
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
    batch, shape = value.shape[0], value.shape[1:]
    store[node] = explicit_block(store[node], batch, shape, value) + explicit_block(block, batch, shape, value)


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

    def encode(self, plan, g, sources: Sequence[int]) -> Optional[List[Tuple[str, List[Callable]]]]:
        """The node as entries of the op's graph program (program.py): [(entry, parameter getters)], the
        first entry reading the value slots `sources` (empty: the previous slot), each later one the entry
        before it; None when the node has no encoding (it keeps the model off the single-op path)."""
        return None
