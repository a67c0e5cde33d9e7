"""Channel-dependency analysis: find every set of coupled channels in a traced model."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from networkx.utils import UnionFind
from tabulate import tabulate
from torch import nn

from . import rules  # noqa: F401  (registers the channel rules)
from .emptiable import Emptiable, find_emptiable, group_notes
from .layers import Layer, find_layers, unique_name
from .labels import NONE, LabelSpace, Member, Producer, channels_vary, compress, no_channels
from .rules.registry import RuleContext, compressed, describe, find_rule, fixed_like, tensors_in
from .trace import trace

OUTPUT_REASON = "reaches the model output"
GRID_LIMIT = 1 << 20  # entries of a tensor used directly with several dims that get their own atoms
CONSTANT_FILLS = (torch.zeros, torch.ones, torch.full, torch.empty)
# the uses that couple such entries one to one, or gather them (a table of position biases)
GRID_RULES = (rules.arithmetic.arithmetic, rules.concat.cat, rules.concat.getitem, rules.windows.relative_position_bias)
INPUT_REASON = "comes from the model input"


@dataclass
class GroupMember:
    """Where a group's channels live: ``index[i]`` along ``dim`` of ``name`` is unit ``unit[i]``.

    ``kind`` is "param" (a parameter or buffer, by qualified name) or "tensor" (a node's output).
    """

    kind: str
    name: str
    dim: int
    index: torch.Tensor
    unit: torch.Tensor

    def __repr__(self) -> str:
        return f"{self.kind} {self.name}[dim {self.dim}] ({len(self.index)} entries)"


@dataclass
class ChannelGroup:
    """A set of coupled channels: removing unit ``u`` removes it from every member at once."""

    name: str
    size: int
    members: list[GroupMember]
    prunable: bool
    reason: str | None
    producers: list[str]
    exact: bool = True  # removing a channel leaves the others unchanged (nothing normalises across them)
    blocked: bool = False  # some channel can never be removed (a boundary, the model output)
    note: str | None = None  # for a prunable group: which units compaction keeps beyond the masks

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else f"not prunable: {self.reason}"
        return f"ChannelGroup({self.name!r}, size={self.size}, {state})"


@dataclass
class Analysis:
    """The coupled channel groups of a traced model, and the unit map the rewrites use."""

    gm: torch.fx.GraphModule
    space: LabelSpace
    groups: list[ChannelGroup]
    labels: dict[str, Any]
    roots: torch.Tensor
    unit_of: dict[int, tuple[int, int]]
    layers: list[Layer] = field(default_factory=list)  # removable residual branches
    tainted: set[str] = field(default_factory=set)  # nodes where a masked channel may be non-zero
    group_of: torch.Tensor | None = None  # per root: its group's index, or -1
    unit_in: torch.Tensor | None = None  # per root: its unit's index in the group, or -1
    emptiable: list[Emptiable] = field(default_factory=list)  # values that keep one of their units

    def group(self, name: str) -> ChannelGroup:
        """The group called ``name``."""
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def layer(self, name: str) -> Layer:
        """The removable layer called ``name``."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def __str__(self) -> str:
        widest = [0] * len(self.groups)  # channels of each group's widest producer (a unit may hold several)
        for p in self.space.producers:
            gi = int(self.group_of[self.roots[p.atoms[0]]])
            widest[gi] = max(widest[gi], len(p.atoms))
        rows = [
            (g.name, g.size, channels, len(g.producers), len([m for m in g.members if m.kind == "param"]),
             "yes" if g.prunable else "no", g.reason or g.note or "")
            for g, channels in zip(self.groups, widest)
        ]
        head = ("group", "units", "channels", "producers", "param members", "prunable", "reason / note")
        return tabulate(rows, head, tablefmt="simple", maxcolwidths=[None, None, None, None, None, None, 70])


class _LabelInterpreter(torch.fx.Interpreter):
    """Runs the graph on label tensors, applying each node's channel rule."""

    def __init__(self, gm: torch.fx.GraphModule, space: LabelSpace):
        super().__init__(gm, garbage_collect_values=False)
        self.space = space
        self.tainted: set[str] = set()

    def run_node(self, n: torch.fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        meta = n.meta.get("tensor_meta")
        if n.op == "placeholder":
            return fixed_like(self.space, meta, INPUT_REASON)
        if n.op == "get_attr":
            return self._attribute(n)
        if n.op == "output":
            for labels in tensors_in(args):
                self.space.block(labels, OUTPUT_REASON)
            return args[0]
        if not tensors_in((args, kwargs)) and n.op != "call_module":
            value = getattr(self, n.op)(n.target, args, kwargs)
            if n.target in CONSTANT_FILLS and isinstance(value, torch.Tensor) and value.numel() <= GRID_LIMIT:
                # a constant (an RNN's zero initial state): each entry follows what it meets; the
                # literal sizes are rewritten by compaction
                return self.space.fresh(value.numel()).reshape(value.shape)
            if tensors_in(value):  # a tensor made from nothing has a fixed shape
                return fixed_like(self.space, meta, f"created with a fixed shape by {describe(n, self.module)}")
            return value
        ctx = RuleContext(self.space, n, self.module, tainted_inputs=self.tainted)
        found = find_rule(n, self.module)
        if found is not None:
            producers = len(self.space.producers)
            try:
                out = found(ctx, *args, **kwargs)
            except Exception as e:  # a rule that cannot follow this call makes it a boundary
                return ctx.boundary((args, kwargs), f"{ctx.where} is not understood ({type(e).__name__}: {e})")
            fresh = len(self.space.producers) > producers  # a producer's channels are zeroed at its output
            if not fresh and (ctx.tainted or any(a.name in self.tainted for a in n.all_input_nodes)):
                self.tainted.add(n.name)
            return out
        return ctx.boundary((args, kwargs))

    def _attribute(self, n: torch.fx.Node) -> Any:
        value = self.fetch_attr(n.target)
        if not isinstance(value, torch.Tensor):
            return value
        dims = [d for d, size in enumerate(value.shape) if size > 1]
        if not value.is_floating_point():
            return self.space.fixed(value.shape, f"tensor '{n.target}' holds integers (indices, not channels)")
        if not dims:
            return no_channels(value.shape)
        if len(dims) > 1:
            if value.numel() > GRID_LIMIT or not all(find_rule(u, self.module) in GRID_RULES for u in n.users):
                return self.space.fixed(value.shape, f"tensor '{n.target}' is used directly with several dims")
            # added or concatenated: which dim holds channels shows once those ops have coupled its entries
            atoms = self.space.fresh(value.numel()).reshape(value.shape)
            self.space.grids.append((self.space.canonical(n.target), n.name, atoms))
            return atoms
        owner = self.space.canonical(n.target)
        atoms = self.space.owned(owner, "out", value.shape[dims[0]])
        self.space.add_producer(Producer(n.name, n.target, dims[0], atoms, "attribute"))
        self.space.add_member(Member(owner, dims[0], atoms, "out", n.name))
        view = [1] * value.dim()
        view[dims[0]] = -1
        return atoms.reshape(view).expand(value.shape)


def analyze(
    model: nn.Module, example_inputs: Any, leaf_modules=(), concrete_args: dict | None = None,
) -> Analysis:
    """Find every group of coupled channels in ``model``; never changes ``model``.

    >>> print(analyze(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224)))
    """
    gm = trace(model, example_inputs, leaf_modules, concrete_args)
    space = LabelSpace(aliases=tensor_aliases(gm))
    interpreter = _LabelInterpreter(gm, space)
    interpreter.run(*[None] * len(gm.graph.find_nodes(op="placeholder")))
    labels = {n.name: compressed(v) for n, v in interpreter.env.items()}
    analysis = _build(gm, space, labels)
    analysis.tainted = interpreter.tainted
    analysis.layers = _layers(analysis)
    return analysis


def _layers(analysis: Analysis) -> list[Layer]:
    """The removable layers, each with the groups whose producers all lie inside it."""
    taken = {g.name for g in analysis.groups} | {p.name for p in analysis.space.producers}
    layers = find_layers(analysis.gm, taken)
    nodes: list[set[str]] = [set() for _ in analysis.groups]
    for p in analysis.space.producers:
        nodes[int(analysis.group_of[analysis.roots[p.atoms[0]]])].add(p.node)
    for layer in layers:
        inside = set(layer.nodes)
        layer.groups = [g.name for g, where in zip(analysis.groups, nodes) if where and where <= inside]
    return layers


def tensor_aliases(module: nn.Module) -> dict[str, str]:
    """Every further name of a parameter or buffer registered under several names -> its first name,
    in the order ``named_parameters``/``named_buffers`` list them."""
    first: dict[int, str] = {}
    aliases = {}
    named = itertools.chain(module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False))
    for name, t in named:
        aliases[name] = first.setdefault(id(t), name)
    return {k: v for k, v in aliases.items() if k != v}


def _build(gm: torch.fx.GraphModule, space: LabelSpace, labels: dict[str, Any]) -> Analysis:
    roots = _resolve_splits(space)
    _resolve_mixes(space, roots)
    _resolve_grids(space, roots)
    blocked = _by_root(space.blocked, roots)
    inexact = _by_root(space.inexact, roots)
    components = UnionFind()
    for p in space.producers:
        units = roots[p.atoms].tolist()
        components.union(*units)
    order: dict[Any, list[int]] = {}
    producers: dict[Any, list[Producer]] = {}
    for p in space.producers:
        key = components[int(roots[p.atoms[0]])]
        units = order.setdefault(key, [])
        producers.setdefault(key, []).append(p)
        seen = set(units)
        for u in roots[p.atoms].tolist():
            if u not in seen:
                units.append(u)
                seen.add(u)
    groups, unit_of, used = [], {}, set()
    for gi, (key, units) in enumerate(order.items()):
        plist = producers[key]
        name = _group_name(plist, used)
        for ui, u in enumerate(units):
            unit_of[u] = (gi, ui)
        reason = next((blocked[u] for u in units if u in blocked), None)
        soft = next((inexact[u] for u in units if u in inexact), None)
        groups.append(ChannelGroup(
            name=name, size=len(units), members=[], prunable=reason is None and soft is None,
            reason=reason or (f"not exactly prunable: {soft}" if soft else None),
            producers=list(dict.fromkeys(p.name for p in plist)), exact=soft is None, blocked=reason is not None,
        ))
    group_of, unit_in = _unit_arrays(len(roots), unit_of)
    _attach_members(groups, space, labels, roots, group_of, unit_in)
    values = [(node, node if isinstance(value, torch.Tensor) else f"{node}[{i}]", t)  # a tuple's pieces by position
              for node, value in labels.items() for i, t in enumerate(tensors_in(value))]
    emptiable = find_emptiable(values, space.producers, roots, group_of, [g.size for g in groups],
                               [not g.blocked for g in groups])
    for g, note in zip(groups, group_notes(emptiable, unit_of, len(groups))):
        g.note = note
    return Analysis(gm, space, groups, labels, roots, unit_of, group_of=group_of, unit_in=unit_in, emptiable=emptiable)


def _units(labels: torch.Tensor, roots: torch.Tensor) -> torch.Tensor:
    """The unit root of every position of a label tensor (NONE where it holds no channel), compressed."""
    return compress(torch.where(labels >= 0, roots[labels.clamp(min=0)], NONE))


def _resolve_splits(space: LabelSpace) -> torch.Tensor:
    """Give every reshape that spread channels over several dims one dim along which its units vary.

    Where the rest of the graph already made them vary along one dim (attention merges the entries
    of each head), that stays; otherwise the units run along the innermost varying dim, each merged
    across the others (a channel shuffle's (g, C/g) grid: the C/g positions). Returns the unit roots.
    """
    for attempt in range(3):  # merging only removes variation: one pass settles all but mixed grids
        roots = space.roots()
        spread = [(units, [d for d in range(units.dim()) if channels_vary(units, d)])
                  for units in (_units(labels, roots) for labels in space.splits)]
        spread = [(units, varying) for units, varying in spread if len(varying) > 1]
        if not spread:
            return roots
        for units, varying in spread:
            if attempt < 2:
                space.per_index(units, varying[-1])
            else:  # channels mixed with entries of no channel along the other dims
                space.block(units, "a reshape spreads these channels over several dims")
    return space.roots()


def _resolve_mixes(space: LabelSpace, roots: torch.Tensor) -> None:
    """An op that mixed values along dims where units vary makes those units not exactly prunable."""
    for labels, dims, reason in space.mixes:
        units = _units(labels, roots)
        if any(units.shape[d] > 1 for d in dims):
            space.mark_inexact(labels, reason)


def _by_root(reasons: dict[int, str], roots: torch.Tensor) -> dict[int, str]:
    """Reasons by atom -> reasons by unit root."""
    atoms = torch.tensor(list(reasons), dtype=torch.long)
    return dict(zip(roots[atoms].tolist(), reasons.values()))


def _resolve_grids(space: LabelSpace, roots: torch.Tensor) -> None:
    """Give each tensor used directly with several dims its channel dim: the one dim along which its
    entries' units differ (a (1, S, E) position embedding added to an (N, S, E) stream: E). One whose
    units differ along several dims cannot lose a unit as a slice: its units are blocked."""
    for owner, node, atoms in space.grids:
        units = compress(roots[atoms])
        varying = [d for d in range(units.dim()) if units.shape[d] > 1]
        if len(varying) == 1:
            d = varying[0]
            space.add_member(Member(owner, d, units.movedim(d, 0).reshape(-1), "channel", node))
        elif len(varying) > 1:
            space.block(units, f"tensor '{owner}' is used directly with channels along several dims")


def _unit_arrays(n: int, unit_of: dict[int, tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``unit_of`` as two arrays over roots: group index and unit index (-1 outside groups)."""
    group_of = torch.full((n,), -1, dtype=torch.long)
    unit_in = torch.full((n,), -1, dtype=torch.long)
    if unit_of:
        roots = torch.tensor(list(unit_of))
        where = torch.tensor(list(unit_of.values()))
        group_of[roots], unit_in[roots] = where[:, 0], where[:, 1]
    return group_of, unit_in


def _group_name(plist: list[Producer], used: set[str]) -> str:
    modules = [p for p in plist if p.kind == "module"]
    return unique_name((modules or plist)[0].name, used)


def _attach_members(groups, space, labels, roots, group_of, unit_in) -> None:
    def add(kind: str, name: str, dim: int, atoms: torch.Tensor) -> None:
        r = torch.where(atoms >= 0, roots[atoms.clamp(min=0)], 0)
        g = torch.where(atoms >= 0, group_of[r], -1)
        for gi in torch.unique(g[g >= 0]).tolist():
            idx = (g == gi).nonzero().flatten()
            groups[gi].members.append(GroupMember(kind, name, dim, idx, unit_in[r[idx]]))

    seen = set()
    for m in space.members:
        if (m.owner, m.dim) not in seen:
            seen.add((m.owner, m.dim))
            add("param", m.owner, m.dim, m.atoms)
    for node, value in labels.items():
        if isinstance(value, torch.Tensor):
            small = compress(value)
            for d in range(value.dim()):
                if small.shape[d] > 1:
                    add("tensor", node, d, small.movedim(d, 0).reshape(small.shape[d], -1)[:, 0])
