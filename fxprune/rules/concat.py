"""Concatenation, splitting and indexing: channels keep their identity at shifted offsets.

cat:   out[o_k + i] <- input_k[i]            split/chunk: piece_k[i] <- x[o_k + i]
x[..., a:b]: out[i] <- x[a + i]              x[..., c]: channel c is selected and can't be removed
x[idx] (idx an integer tensor): out[j, ...] <- x[idx[j], ...] along a dim without channels; from a
parameter used directly, the gathered entries of each position of the other dims merge into one unit
(a table of relative position biases: one unit per head)
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from ..labels import atoms_in, compress, varies
from .registry import RuleContext, compressed, rule, run_on_labels

MOVES = (torch.split, torch.chunk, torch.narrow, "split", "chunk", "narrow")


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


@rule(torch.stack)
def stack(ctx: RuleContext, tensors, dim: int = 0) -> torch.Tensor:  # out[k, i] <- input_k[i]
    for t in tensors[1:]:  # stacked tensors keep equal shapes: position i is one unit in all
        ctx.space.union(tensors[0], t)
    return run_on_labels(ctx, (tensors, dim), {})


@rule(torch.unbind, "unbind", torch.tensor_split, "tensor_split")
def split_by_position(ctx: RuleContext, x: torch.Tensor, *args, **kwargs):  # pieces named by position
    if ctx.node.target in (torch.unbind, "unbind"):
        dim = kwargs.get("dim", args[0] if args else 0)
    else:
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    dim %= x.dim()
    if varies(x, dim) and ctx.node.target in (torch.unbind, "unbind"):
        # the pieces stay as many while each keeps a channel (q, k, v of several heads each); one
        # that is a single channel cannot lose it
        for i in range(x.shape[dim]):
            if len(atoms_in(x.select(dim, i))) == 1:
                ctx.space.block(x.select(dim, i), f"{ctx.where} splits channels at fixed positions")
    elif varies(x, dim):
        return ctx.boundary(x, f"{ctx.where} splits channels at fixed positions")
    return run_on_labels(ctx, (x, *args), kwargs)


def _gathered_dim(ctx: RuleContext, x: torch.Tensor, index: tuple) -> int | None:
    """The dim that ``x[index]`` gathers with one integer tensor, the other entries taking whole dims."""
    raw = ctx.node.args[1] if isinstance(ctx.node.args[1], tuple) else (ctx.node.args[1],)
    tensors = [d for d, i in enumerate(index) if isinstance(i, torch.Tensor)]
    if len(tensors) != 1 or any(i != slice(None) for d, i in enumerate(index) if d != tensors[0]):
        return None
    meta = getattr(raw[tensors[0]], "meta", {}).get("tensor_meta")
    if meta is None or meta.dtype not in (torch.long, torch.int, torch.int32, torch.int16, torch.int8, torch.uint8):
        return None
    source = ctx.node.args[0]
    table = isinstance(source, torch.fx.Node) and any(node == source.name for _, node, _ in ctx.space.grids)
    if tensors[0] >= x.dim() or (varies(x, tensors[0]) and not table):
        return None  # channels selected by index: the index is not rewritten
    return tensors[0]


def _gather(ctx: RuleContext, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Labels of ``x`` gathered along ``dim``: each position of the other dims, merged across ``dim``."""
    small = compress(x).movedim(dim, -1)
    rows = small.reshape(-1, small.shape[-1])
    merged = torch.tensor([ctx.space.union_all(r) for r in rows], dtype=torch.long).reshape(small.shape[:-1])
    out = ctx.out_shape()
    gathered = len(out) - (x.dim() - 1)  # the index's dims replace ``dim``
    view = list(merged.shape[:dim]) + [1] * gathered + list(merged.shape[dim:])
    return merged.reshape(view).expand(out)


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
    if any(isinstance(i, (torch.Tensor, list)) for i in index):
        gathered = _gathered_dim(ctx, x, index)
        if gathered is None:
            return ctx.boundary((x, index), f"{ctx.where} indexes with a tensor or list")
        return _gather(ctx, x, gathered)
    for dim, entry in indexed_dims(index, x.dim()):
        if not varies(x, dim):
            continue
        if isinstance(entry, int) and len(atoms_in(x.select(dim, entry))) == 1:
            # one channel: it cannot be removed and still be indexed (a slice of several channels,
            # like one layer's row of an RNN state, loses its index only with all of them)
            ctx.space.block(x.select(dim, entry), f"channel selected by an integer index at {ctx.where}")
        elif isinstance(entry, slice) and entry.step not in (None, 1):
            ctx.space.block(x, f"{ctx.where} slices channels with step {entry.step}")
        elif isinstance(entry, slice) and len(range(*entry.indices(x.shape[dim]))) == 1 \
                and len(atoms_in(x[(slice(None),) * dim + (entry,)])) == 1:
            ctx.space.block(x[(slice(None),) * dim + (entry,)], f"one channel sliced out at {ctx.where}")
    return compressed(x[index])

