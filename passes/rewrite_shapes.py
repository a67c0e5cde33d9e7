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
from fxprune.labels import channels_vary
from fxprune.masks import Plan

Rewrite = Callable[[torch.fx.Node, "Shapes"], None]
REWRITES: dict[object, Rewrite] = {}


class Shapes:
    """Old and new sizes of every node: for each dim of a node's output, the old index of each new
    index, or -1 for a new one. Compaction keeps a subset of the indices (:meth:`of_plan`); growth
    adds new ones. ``index_along(name, dim)`` gives that index for the node called ``name``, and
    ``size_along(name, dim)`` its length, where that is cheaper to know."""

    def __init__(self, labels: dict, index_along: Callable[[str, int], torch.Tensor],
                 size_along: Callable[[str, int], int] | None = None):
        self._labels, self._index_along = labels, index_along
        self._size_along = size_along or (lambda name, dim: len(index_along(name, dim)))

    @classmethod
    def of_plan(cls, plan: Plan) -> Shapes:
        """The sizes after compaction under ``plan``."""
        return cls(plan.analysis.labels, lambda name, dim: plan.kept_at((name, dim)).nonzero().flatten(),
                   lambda name, dim: plan.size_at((name, dim)))

    def labels(self, node: torch.fx.Node):
        """The analysis' labels of ``node``'s output (None for a node added since)."""
        return self._labels.get(node.name)

    def index(self, node: torch.fx.Node, dim: int) -> torch.Tensor:
        """The old index of each new index along ``dim`` of ``node``'s output (-1: new)."""
        return self._index_along(node.name, dim % self._labels[node.name].dim())

    def anchors(self, node: torch.fx.Node, dim: int) -> torch.Tensor:
        """For each new index, the old index it is or follows: a bound b (old) becomes the number
        of anchors below b."""
        index = self.index(node, dim)
        return torch.cummax(index, 0).values if len(index) else index

    def new_shape(self, node: torch.fx.Node) -> list[int]:
        return [self._size_along(node.name, d) for d in range(self._labels[node.name].dim())]

    def resized(self, node: torch.fx.Node, dim: int) -> bool:
        """Whether ``node``'s output changes size along ``dim`` (a rewrite keeps the order of the
        indices it keeps, so an unchanged size is an unchanged index)."""
        return self._size_along(node.name, dim % self._labels[node.name].dim()) != self._labels[node.name].shape[dim]

    def changes(self, node: torch.fx.Node) -> bool:
        """Whether ``node``'s output, or one of its inputs, changes size."""
        return any(isinstance(labels := self._labels.get(n.name), torch.Tensor) and
                   any(self.resized(n, d) for d in range(labels.dim()))
                   for n in [node, *node.all_input_nodes])


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
    """A size computed in the graph is replaced too along a dim of channels (``reshape(B, N, C)`` or
    ``C // heads`` with C another tensor's width): it counts channels, fixed once compacted."""
    x, *rest = node.args
    sizes, packed = _sizes(tuple(rest))
    new, old, labels = shapes.new_shape(node), node.meta["tensor_meta"].shape, shapes.labels(node)
    channels = [new[i] != old[i] or channels_vary(labels, i) for i in range(len(new))]
    sizes = [new[i] if (isinstance(s, int) and s != -1) or (isinstance(s, torch.fx.Node) and channels[i]) else s
             for i, s in enumerate(sizes)]
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
    anchors = shapes.anchors(x, dim)
    n = x.meta["tensor_meta"].shape[dim]
    if node.target in ("chunk", torch.chunk):
        size = -(-n // size)
    bounds = list(range(0, n, size)) + [n] if isinstance(size, int) else [sum(size[:i]) for i in range(len(size) + 1)]
    sections = [int(((anchors >= a) & (anchors < b)).sum()) for a, b in zip(bounds, bounds[1:])]
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
            size = x.meta["tensor_meta"].shape[dim]
            if shapes.resized(x, dim):  # where nothing changes the index stays as written
                e = _over_anchors(e, shapes.anchors(x, dim), size)
            dim += 1
        out.append(e)
    node.args = (x, tuple(out) if isinstance(index, tuple) else out[0])


def _over_anchors(entry, anchors: torch.Tensor, size: int):
    """An int or slice index along a dim of ``size`` old indices, counted over the new ones."""
    before = lambda i: int((anchors < i).sum())  # noqa: E731
    if isinstance(entry, int):
        return before(entry % size)
    if isinstance(entry, slice):
        start, stop, _ = entry.indices(size)
        return slice(None if entry.start is None else before(start), None if entry.stop is None else before(stop), entry.step)
    return entry


@rewrite("narrow", torch.narrow)
def _narrow(node: torch.fx.Node, shapes: Shapes) -> None:
    x, dim, start, length = node.args
    anchors = shapes.anchors(x, dim)
    first, end = int((anchors < start).sum()), int((anchors < start + length).sum())
    node.args = (x, dim, first, end - first)


def _unflatten_module(node: torch.fx.Node, shapes: Shapes, gm: torch.fx.GraphModule) -> None:
    m = gm.get_submodule(node.target)
    new = shapes.new_shape(node)
    start = m.dim % len(new)
    m.unflattened_size = tuple(new[start:start + len(m.unflattened_size)])


MODULE_REWRITES = {nn.Unflatten: _unflatten_module}  # modules that hold literal sizes


def rewrite_shapes(gm: torch.fx.GraphModule, shapes: Shapes) -> None:
    """Rewrite the shape arguments of ``gm``'s nodes for the new sizes ``shapes`` gives, in place."""
    changed = False
    for node in gm.graph.nodes:
        if shapes.labels(node) is None:
            continue
        if node.op == "call_module" and type(gm.get_submodule(node.target)) in MODULE_REWRITES:
            if shapes.changes(node):
                MODULE_REWRITES[type(gm.get_submodule(node.target))](node, shapes, gm)
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        fn = REWRITES.get(node.target)
        if fn is not None and shapes.changes(node):
            changed = True
            try:
                fn(node, shapes)
            except Exception as e:
                raise CompactError(f"cannot rewrite the arguments of node '{node.name}' ({node.format_node()}): {e}") from e
    if changed:
        gm.recompile()
