"""Rewrite shape arguments (view sizes, split sections, slice bounds) to the compacted channel counts.

Arguments computed in the graph (``x.size(1) // g``) follow by themselves; literal integers that
count channels are replaced, one small handler per op.
"""
from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx
from torch import nn

from fxprune.errors import CompactError
from fxprune.labels import compress
from fxprune.masks import Plan

Rewrite = Callable[[torch.fx.Node, "Shapes"], None]
REWRITES: dict[object, Rewrite] = {}


class Shapes:
    """Old and new sizes of every node, from the analysis' labels and the plan."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def labels(self, node: torch.fx.Node):
        """The analysis' labels of ``node``'s output (None for a node added since)."""
        return self.plan.analysis.labels.get(node.name)

    def kept(self, node: torch.fx.Node, dim: int) -> torch.Tensor:
        """Which indices along ``dim`` of ``node``'s output survive."""
        return self.plan.kept_along(self.plan.analysis.labels[node.name], dim)

    def new_shape(self, node: torch.fx.Node) -> list[int]:
        labels = self.plan.analysis.labels[node.name]
        return [int(self.kept(node, d).sum()) for d in range(labels.dim())]


def rewrite(*targets: object):
    def register(fn: Rewrite) -> Rewrite:
        for t in targets:
            REWRITES[t] = fn
        return fn

    return register


def _sizes(args: tuple) -> tuple[list, bool]:
    packed = len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size))
    return list(args[0] if packed else args), packed


@rewrite("view", "reshape", torch.reshape, "expand")  # literal sizes <- the new output sizes
def _shape_args(node: torch.fx.Node, shapes: Shapes) -> None:
    x, *rest = node.args
    sizes, packed = _sizes(tuple(rest))
    new = shapes.new_shape(node)
    sizes = [new[i] if isinstance(s, int) and s != -1 else s for i, s in enumerate(sizes)]
    node.args = (x, tuple(sizes)) if packed else (x, *sizes)


@rewrite(torch.zeros, torch.ones, torch.empty, torch.full)  # literal sizes <- the new sizes
def _created(node: torch.fx.Node, shapes: Shapes) -> None:
    count = 2 if node.target is torch.full else None  # full(size, fill_value)
    args = node.args[:1] if count else node.args
    sizes, packed = _sizes(tuple(args))
    new = shapes.new_shape(node)
    sizes = [new[i] if isinstance(s, int) else s for i, s in enumerate(sizes)]
    head = (tuple(sizes),) if packed else tuple(sizes)
    node.args = head + tuple(node.args[1:count]) if count else head


@rewrite("unflatten", torch.unflatten)  # sizes <- the new sizes of the unflattened dims
def _unflatten(node: torch.fx.Node, shapes: Shapes) -> None:
    x, dim, sizes = node.args
    new = shapes.new_shape(node)
    start = dim % len(new)
    node.args = (x, dim, tuple(new[start + i] if s != -1 else s for i, s in enumerate(sizes)))


@rewrite("split", torch.split, "chunk", torch.chunk)  # sections <- kept channels per piece
def _split(node: torch.fx.Node, shapes: Shapes) -> None:
    x, size, *rest = node.args
    dim = node.kwargs.get("dim", rest[0] if rest else 0)
    kept = shapes.kept(x, dim)
    n = len(kept)
    if node.target in ("chunk", torch.chunk):
        size = -(-n // size)
    bounds = list(range(0, n, size)) + [n] if isinstance(size, int) else [sum(size[:i]) for i in range(len(size) + 1)]
    sections = [int(kept[a:b].sum()) for a, b in zip(bounds, bounds[1:])]
    node.target = "split" if node.op == "call_method" else torch.split
    node.args, node.kwargs = (x, sections, dim), {}


@rewrite(operator.getitem)  # x[a:b] <- x[a':b'] with a', b' counted over kept channels
def _getitem(node: torch.fx.Node, shapes: Shapes) -> None:
    x, index = node.args
    if not isinstance(x, torch.fx.Node) or "tensor_meta" not in x.meta or not hasattr(x.meta["tensor_meta"], "shape"):
        return
    entries = index if isinstance(index, tuple) else (index,)
    ndim = len(x.meta["tensor_meta"].shape)
    consumed = sum(1 for e in entries if e is not None and e is not Ellipsis)
    out, dim = [], 0
    for e in entries:
        if e is Ellipsis:
            dim += ndim - consumed
        elif e is not None:
            kept = shapes.kept(x, dim)
            if not bool(kept.all()):  # where nothing is removed the index stays as written (-1 stays -1)
                e = _over_kept(e, kept)
            dim += 1
        out.append(e)
    node.args = (x, tuple(out) if isinstance(index, tuple) else out[0])


def _over_kept(entry, kept: torch.Tensor):
    """An int or slice index along a dim, counted over the kept positions only."""
    before = torch.cat([torch.zeros(1, dtype=torch.long), kept.cumsum(0)])
    if isinstance(entry, int):
        return int(before[entry % len(kept)])
    if isinstance(entry, slice):
        start, stop, _ = entry.indices(len(kept))
        return slice(None if entry.start is None else int(before[start]),
                     None if entry.stop is None else int(before[stop]), entry.step)
    return entry


@rewrite("narrow", torch.narrow)
def _narrow(node: torch.fx.Node, shapes: Shapes) -> None:
    x, dim, start, length = node.args
    kept = shapes.kept(x, dim)
    node.args = (x, dim, int(kept[:start].sum()), int(kept[start:start + length].sum()))


def _unflatten_module(node: torch.fx.Node, shapes: Shapes, gm: torch.fx.GraphModule) -> None:
    m = gm.get_submodule(node.target)
    new = shapes.new_shape(node)
    start = m.dim % len(new)
    m.unflattened_size = tuple(new[start:start + len(m.unflattened_size)])


MODULE_REWRITES = {nn.Unflatten: _unflatten_module}  # modules that hold literal sizes


def rewrite_shapes(gm: torch.fx.GraphModule, plan: Plan) -> None:
    """Rewrite the shape arguments of ``gm``'s nodes for the channels ``plan`` keeps, in place."""
    shapes, changed = Shapes(plan), False
    for node in gm.graph.nodes:
        if node.name not in plan.analysis.labels:
            continue
        if node.op == "call_module" and type(gm.get_submodule(node.target)) in MODULE_REWRITES:
            if _changes(node, shapes):
                MODULE_REWRITES[type(gm.get_submodule(node.target))](node, shapes, gm)
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        fn = REWRITES.get(node.target)
        if fn is not None and _changes(node, shapes):
            changed = True
            try:
                fn(node, shapes)
            except Exception as e:
                raise CompactError(f"cannot rewrite the arguments of node '{node.name}' ({node.format_node()}): {e}") from e
    if changed:
        gm.recompile()


def _changes(node: torch.fx.Node, shapes: Shapes) -> bool:
    inputs = [a for a in node.all_input_nodes if a.name in shapes.plan.analysis.labels]
    return any(
        isinstance(shapes.plan.analysis.labels[n.name], torch.Tensor)
        and not bool(shapes.plan.kept(compress(shapes.plan.analysis.labels[n.name])).all())
        for n in [node, *inputs]
    )
