"""Concatenation, splitting and indexing: channels keep their identity at shifted offsets.

cat:   out[o_k + i] <- input_k[i]            split/chunk: piece_k[i] <- x[o_k + i]
x[..., a:b]: out[i] <- x[a + i]              x[..., c]: channel c is selected and can't be removed
"""
from __future__ import annotations

import operator

import torch

from ..labels import compress, varies
from .registry import RuleContext, compressed, rule, run_on_labels

MOVES = (
    torch.stack, torch.split, torch.chunk, torch.unbind,
    torch.narrow, torch.tensor_split, "split", "chunk", "unbind", "narrow", "tensor_split",
)


@rule(*MOVES)
def move(ctx: RuleContext, *args, **kwargs):  # positions move, channels follow
    return run_on_labels(ctx, args, kwargs)


@rule(torch.cat, torch.concat, torch.concatenate)
def cat(ctx: RuleContext, tensors, dim: int = 0) -> torch.Tensor:  # out[o_k + i] <- input_k[i]
    shape = ctx.out_shape()
    dim %= len(shape)
    small = [compress(t) for t in tensors]
    flat = [d for d in range(len(shape)) if d != dim and all(s.shape[d] == 1 for s in small)]
    parts = list(tensors)
    for d in flat:  # constant in every input: concatenate one slice, broadcast the rest
        parts = [t.narrow(d, 0, 1) for t in parts]
    return torch.cat(parts, dim).expand(shape)


def indexed_dims(index: tuple, ndim: int) -> list[tuple[int, object]]:
    """(input dim, index entry) for each entry of a basic index that consumes a dimension."""
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    out, dim = [], 0
    for entry in index:
        if entry is Ellipsis:
            dim += ndim - consumed
        elif entry is not None:
            out.append((dim, entry))
            dim += 1
    return out


@rule(operator.getitem, "select")
def getitem(ctx: RuleContext, x, index, *rest):  # out[i] <- x[index(i)]
    if not isinstance(x, torch.Tensor):
        return x[index]
    if ctx.node.target == "select":
        index = (slice(None),) * (index % x.dim()) + (rest[0],)
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, torch.Tensor) for i in index):
        return ctx.boundary((x, index), f"{ctx.where} indexes with a tensor")
    for dim, entry in indexed_dims(index, x.dim()):
        if isinstance(entry, int) and varies(x, dim):
            ctx.space.block(x.select(dim, entry), f"channel selected by an integer index at {ctx.where}")
        elif isinstance(entry, slice) and entry.step not in (None, 1) and varies(x, dim):
            ctx.space.block(x, f"{ctx.where} slices channels with step {entry.step}")
    return compressed(x[index])

