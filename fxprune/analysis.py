"""Channel-dependency analysis: find every set of coupled channels in a traced model."""
from __future__ import annotations

import itertools
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from tabulate import tabulate
from torch import nn

from . import rules  # noqa: F401  (registers the channel rules)
from .collection import gc_paused
from .emptiable import Emptiable, find_emptiable, group_notes
from .layers import Layer, find_layers, unique_name
from .labels import (NONE, AtomUnionFind, IndexTable, LabelSpace, Member, Producer, channels_vary, compress, no_channels,
                     view_key)
from .rules.registry import RuleContext, compressed, describe, find_rule, fixed_like, tensors_in
from .trace import FetchOnce, trace

OUTPUT_REASON = "reaches the model output"
GRID_LIMIT = 1 << 20  # entries of a tensor used directly with several dims that get their own atoms
CONSTANT_FILLS = (torch.zeros, torch.ones, torch.full, torch.empty)
# the uses that couple such entries one to one, or gather them (a table of position biases)
GRID_RULES = (rules.arithmetic.arithmetic, rules.concat.cat, rules.concat.getitem, rules.windows.relative_position_bias)
INPUT_REASON = "comes from the model input"


class GroupMember:
    """Where a group's channels live: ``index[i]`` along ``dim`` of ``name`` is unit ``unit[i]``.

    ``kind`` is "param" (a parameter or buffer, by qualified name) or "tensor" (a node's output).
    The analysis makes ``index`` and ``unit`` as slices of tensors shared by all members, when they
    are first read (a model has hundreds of members; most are never looked at).
    """

    def __init__(self, kind: str, name: str, dim: int, index: torch.Tensor | None = None,
                 unit: torch.Tensor | None = None, _span: tuple | None = None):
        self.kind, self.name, self.dim = kind, name, dim
        self._index, self._unit, self._span = index, unit, _span  # _span: (all indices, all units, start, stop)

    @property
    def index(self) -> torch.Tensor:
        if self._index is None:
            index, _, start, stop = self._span
            self._index = index[start:stop]
        return self._index

    @property
    def unit(self) -> torch.Tensor:
        if self._unit is None:
            _, unit, start, stop = self._span
            self._unit = unit[start:stop]
        return self._unit

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


class UnitMap(MappingABC):
    """Unit root -> (group index, unit index in the group), read from the per-root arrays."""

    def __init__(self, group_of: torch.Tensor, unit_in: torch.Tensor):
        self._group_of, self._unit_in = group_of, unit_in

    def __getitem__(self, root: int) -> tuple[int, int]:
        gi = int(self._group_of[root]) if 0 <= root < len(self._group_of) else -1
        if gi < 0:
            raise KeyError(root)
        return gi, int(self._unit_in[root])

    def __iter__(self):
        return iter((self._group_of >= 0).nonzero().flatten().tolist())

    def items(self):
        roots = (self._group_of >= 0).nonzero().flatten()
        return list(zip(roots.tolist(), zip(self._group_of[roots].tolist(), self._unit_in[roots].tolist())))

    def __len__(self) -> int:
        return int((self._group_of >= 0).sum())


@dataclass
class Analysis:
    """The coupled channel groups of a traced model, and the unit map the rewrites use."""

    gm: torch.fx.GraphModule
    space: LabelSpace
    groups: list[ChannelGroup]
    labels: dict[str, Any]
    roots: torch.Tensor
    unit_of: MappingABC[int, tuple[int, int]]  # unit root -> (group index, unit index)
    layers: list[Layer] = field(default_factory=list)  # removable residual branches
    tainted: set[str] = field(default_factory=set)  # nodes where a masked channel may be non-zero
    group_of: torch.Tensor | None = None  # per root: its group's index, or -1
    unit_in: torch.Tensor | None = None  # per root: its unit's index in the group, or -1
    emptiable: list[Emptiable] = field(default_factory=list)  # values that keep one of their units
    _table: IndexTable | None = field(default=None, repr=False, compare=False)

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

    def index_table(self) -> IndexTable:
        """The atoms of every index along every dim of each node's output (keys ``(node name, dim)``)
        and of each member of ``space.members`` (keys its position in that list)."""
        return self._table

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


class _LabelInterpreter(FetchOnce, torch.fx.Interpreter):
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
        called = self.fetch_attr(n.target) if n.op == "call_module" else None
        ctx = RuleContext(self.space, n, self.module, tainted_inputs=self.tainted, called=called)
        found = find_rule(n, self.module, called)
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


@gc_paused()
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
    return assemble(gm, space, labels, roots)


def assemble(gm: torch.fx.GraphModule, space: LabelSpace, labels: dict[str, Any], roots: torch.Tensor) -> Analysis:
    """The analysis of ``gm`` from its labels, once every atom's unit (``roots``) is known: groups
    in the order of their first producer, units in the order producers list them, members."""
    entries = torch.cat([p.atoms for p in space.producers]) if space.producers else torch.zeros(0, dtype=torch.long)
    which = torch.repeat_interleave(torch.arange(len(space.producers)), torch.tensor([p.atoms.shape[0] for p in space.producers], dtype=torch.long))
    units = roots[entries]
    # a group: the units that producers share, transitively (one producer's channels are one group)
    starts = torch.tensor([0] + [p.atoms.shape[0] for p in space.producers], dtype=torch.long).cumsum(0)[:-1]
    linked = AtomUnionFind()
    linked.add(len(roots))
    linked.union_pairs(torch.stack([units, units[starts][which]], 1))
    key = linked.roots()[units]
    # groups in the order of their first producer, units in the order producers list them
    position = torch.arange(len(entries))
    first_of_key = torch.full((len(roots),), len(entries)).scatter_reduce_(0, key, position, "amin")
    first_of_unit = torch.full((len(roots),), len(entries)).scatter_reduce_(0, units, position, "amin")
    unit_roots = (first_of_unit < len(entries)).nonzero().flatten()
    group_keys = (first_of_key < len(entries)).nonzero().flatten()
    group_keys = group_keys[torch.argsort(first_of_key[group_keys])]
    index_of_key = torch.full((len(roots),), -1).index_put_((group_keys,), torch.arange(len(group_keys)))
    unit_group = index_of_key[key[first_of_unit[unit_roots]]]
    order = torch.argsort(unit_group * (len(entries) + 1) + first_of_unit[unit_roots])
    unit_roots, unit_group = unit_roots[order], unit_group[order]
    sizes = torch.bincount(unit_group, minlength=len(group_keys))
    offsets = sizes.cumsum(0) - sizes
    group_of = torch.full((len(roots),), -1).index_put_((unit_roots,), unit_group)
    unit_in = torch.full((len(roots),), -1).index_put_((unit_roots,), torch.arange(len(unit_roots)) - offsets[unit_group])
    blocked = _first_reason(space.blocked, roots, unit_roots, unit_group, len(group_keys))
    inexact = _first_reason(space.inexact, roots, unit_roots, unit_group, len(group_keys))
    by_group: list[list[Producer]] = [[] for _ in group_keys]
    for p, gi in zip(space.producers, group_of[units[starts]].tolist()):
        by_group[gi].append(p)
    groups, used = [], set()
    for plist, size, reason, soft in zip(by_group, sizes.tolist(), blocked, inexact):
        groups.append(ChannelGroup(
            name=_group_name(plist, used), size=size, members=[], prunable=reason is None and soft is None,
            reason=reason or (f"not exactly prunable: {soft}" if soft else None),
            producers=list(dict.fromkeys(p.name for p in plist)), exact=soft is None, blocked=reason is not None,
        ))
    unit_of = UnitMap(group_of, unit_in)
    table, varying = _index_table(labels, space.members)
    _attach_members(groups, space, varying, roots, group_of, unit_in)
    values = [(node, node if isinstance(value, torch.Tensor) else f"{node}[{i}]", t)  # a tuple's pieces by position
              for node, value in labels.items() for i, t in enumerate(tensors_in(value))]
    emptiable = find_emptiable(values, space.producers, roots, group_of, [g.size for g in groups],
                               [not g.blocked for g in groups])
    for g, note in zip(groups, group_notes(emptiable, unit_of, len(groups))):
        g.note = note
    return Analysis(gm, space, groups, labels, roots, unit_of, group_of=group_of, unit_in=unit_in, emptiable=emptiable,
                    _table=table)

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


def _index_table(labels: dict[str, Any], members: list[Member]) -> tuple[IndexTable, list[tuple[str, int, torch.Tensor]]]:
    """The index table of every node output and member, and (node, dim, atoms) for each dim along
    which a node's labels vary: the atom of each index there (its first one)."""
    table, varying = IndexTable(), []
    for name, value in labels.items():
        if isinstance(value, torch.Tensor):
            varying += [(name, d, rows[:, 0]) for d, rows in table.add_labels(name, value)]
    for i, m in enumerate(members):
        table.add_atoms(i, m.atoms)
    return table, varying


def _first_reason(reasons: dict[int, str], roots: torch.Tensor, unit_roots: torch.Tensor, unit_group: torch.Tensor,
                  n_groups: int) -> list[str | None]:
    """Per group, the reason recorded for its first unit that has one (a unit's reason: the one of
    its atom recorded last), or None."""
    if not reasons:
        return [None] * n_groups
    atoms = torch.tensor(list(reasons), dtype=torch.long)
    latest = torch.full((len(roots),), -1).scatter_reduce_(0, roots[atoms], torch.arange(len(atoms)), "amax")
    found = latest[unit_roots]
    where = (found >= 0).nonzero().flatten()
    first = torch.full((n_groups,), len(unit_roots)).scatter_reduce_(0, unit_group[where], where, "amin")
    texts = list(reasons.values())
    return [texts[int(found[i])] if i < len(unit_roots) else None for i in first.tolist()]


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


def _group_name(plist: list[Producer], used: set[str]) -> str:
    modules = [p for p in plist if p.kind == "module"]
    return unique_name((modules or plist)[0].name, used)


def _attach_members(groups, space, varying, roots, group_of, unit_in) -> None:
    """Every tensor dim that holds a group's channels becomes one of its members: the parameters
    and buffers (each dim once), then the node outputs along each dim where channels vary
    (``varying``: node, dim, the atom of each index)."""
    sources: list[tuple[str, str, int, torch.Tensor]] = []
    seen = set()
    for m in space.members:
        if (m.owner, m.dim) not in seen:
            seen.add((m.owner, m.dim))
            sources.append(("param", m.owner, m.dim, m.atoms))
    sources += [("tensor", node, d, atoms) for node, d, atoms in varying]
    distinct: dict[tuple, int] = {}  # many sources view the same atoms (a conv's and its BatchNorm's)
    vectors = [distinct.setdefault(view_key(s[3]), len(distinct)) for s in sources]
    atoms_of = {i: s[3] for s, i in zip(sources, vectors)}
    pieces, index, unit = _pieces_by_group([atoms_of[i] for i in range(len(distinct))], roots, group_of, unit_in, len(groups))
    for (kind, name, dim, _), i in zip(sources, vectors):
        for gi, start, stop in pieces[i]:
            groups[gi].members.append(GroupMember(kind, name, dim, _span=(index, unit, start, stop)))


def _pieces_by_group(vectors: list[torch.Tensor], roots, group_of, unit_in, n_groups: int):
    """For each vector of atoms, (group, start, stop) per group it touches, groups ascending: its
    positions and their units in that group are ``index[start:stop]`` and ``unit[start:stop]``.
    Returns the pieces, ``index`` and ``unit``."""
    out: list[list] = [[] for _ in vectors]
    if not vectors:
        return out, None, None
    atoms = torch.cat(vectors)
    lengths = torch.tensor([v.shape[0] for v in vectors], dtype=torch.long)
    vector = torch.repeat_interleave(torch.arange(len(vectors)), lengths)
    position = torch.arange(atoms.shape[0]) - (lengths.cumsum(0) - lengths)[vector]
    r = roots[atoms.clamp(min=0)]
    group = torch.where(atoms >= 0, group_of[r], -1)
    inside = (group >= 0).nonzero().flatten()
    key = vector[inside] * n_groups + group[inside]
    if bool((key[1:] < key[:-1]).any()):  # a vector whose groups interleave (a concatenation)
        order = torch.argsort(key, stable=True)
        inside, key = inside[order], key[order]
    keys, counts = torch.unique_consecutive(key, return_counts=True)
    ends = counts.cumsum(0).tolist()
    for k, start, stop in zip(keys.tolist(), [0, *ends[:-1]], ends):
        out[k // n_groups].append((k % n_groups, start, stop))
    return out, position[inside], unit_in[r[inside]]
