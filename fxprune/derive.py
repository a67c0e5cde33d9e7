"""The analysis of a rewritten model, derived from the analysis it was rewritten from.

Compaction keeps a subset of the units and growth adds units, but neither changes what is coupled
to what: the rewritten graph has the same nodes, and each tensor the same channels, minus the
removed ones or plus the new ones at known positions. The labels, members and producers of the
old analysis are therefore relabelled (a kept index keeps its atoms; a new unit gets a counterpart
of each atom of the unit it copies) and the groups assembled again from them, without tracing or
label propagation. The result is analysed afresh instead where the rewrite changed the graph
(removed layers, inserted blocks, zeroing nodes, replaced or wrapped modules whose rule differs;
a bias created by folding is added as the member a fresh analysis finds), or where the rules would
read the new sizes differently: a channel dim shrunk to one index (a size-1 dim is no channel), a
group left with one unit, a grown unit spanning several channels of one producer (a grouped
convolution, a reshape grid), a tensor crossing GRID_LIMIT.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from .analysis import CONSTANT_FILLS, GRID_LIMIT, Analysis, analyze, assemble
from .labels import LabelSpace, Member, Producer, compress, expand_compressed, view_key
from .masks import Plan
from .rules.registry import find_rule

Relabel = Callable[[torch.Tensor], torch.Tensor]  # labels or atoms -> those of the rewritten tensor


def compacted_analysis(plan: Plan, gm: torch.fx.GraphModule, example_inputs: Any) -> Analysis:
    """The analysis of ``gm``, the compaction of ``plan.analysis.gm`` under ``plan``; equal to
    ``analyze(gm, example_inputs)``."""
    analysis = plan.analysis
    spans = analysis.index_table().spans()
    added = _added_tensors(analysis.gm, gm)
    folded = _with_folded_biases(analysis, added) if added is not None else None
    if plan.removed_layers or folded is None or any(n > 1 and plan.size_at(key) == 1 for key, (_, n) in spans.items()) \
            or any(g.size > 1 and int(keep.sum()) == 1 for g, keep in zip(analysis.groups, plan.keep_unit)):
        return analyze(gm, example_inputs)  # see the module docstring

    def relabel(labels: torch.Tensor, name: str) -> torch.Tensor:  # a node's output: sizes from the index table
        if all(plan.size_at((name, d)) == n for d, n in enumerate(labels.shape)):
            return labels
        small = compress(labels)
        for d in range(small.dim()):
            if small.shape[d] > 1:
                small = small.index_select(d, plan.kept_at((name, d)).nonzero().flatten())
        return expand_compressed(small.expand([plan.size_at((name, d)) for d in range(labels.dim())]))

    def relabel_inside(labels: torch.Tensor) -> torch.Tensor:  # a tensor inside a node's output (an RNN's states)
        if bool(plan.kept(labels).all()):
            return labels
        small = compress(labels)
        kept = plan.surviving(small)
        return expand_compressed(kept.expand([kept.shape[d] if small.shape[d] > 1 else n for d, n in enumerate(labels.shape)]))

    def kept(vector: torch.Tensor) -> torch.Tensor:
        keep = plan.kept(vector)
        return vector if bool(keep.all()) else vector[keep]

    relabel = _shared(relabel)  # the same labels give the same sizes, whichever node holds them
    labels = {name: relabel(v, name) if isinstance(v, torch.Tensor) else _map_nest(v, relabel_inside)
              for name, v in analysis.labels.items()}
    kept = _shared(kept)
    members = [_with_atoms(m, kept(m.atoms)) for m in folded]
    producers = [_with_atoms(p, kept(p.atoms)) for p in analysis.space.producers]
    return _derived(analysis, gm, labels, members, producers, analysis.space.count, analysis.roots, example_inputs)


def _with_folded_biases(analysis: Analysis, added: set[str]) -> list[Member] | None:
    """``analysis.space.members`` with the biases that folding created (``added``), each after the
    output member of its layer's weight, where the layer's rule lists it; None if something else
    was added."""
    members = list(analysis.space.members)
    for name in added:
        owner = name.rpartition(".")[0]
        outs = [i for i, m in enumerate(members) if m.owner == f"{owner}.weight" and m.role == "out" and m.dim == 0]
        if not name.endswith(".bias") or not outs:
            return None
        for i in reversed(outs):
            members.insert(i + 1, Member(name, 0, members[i].atoms, "out", members[i].node))
    return members


def grown_analysis(analysis: Analysis, gm: torch.fx.GraphModule, place: Callable[[torch.Tensor, str], tuple | None],
                   example_inputs: Any) -> Analysis:
    """The analysis of ``gm``, ``analysis.gm`` with units added; equal to ``analyze(gm,
    example_inputs)``. ``place(atoms, where)`` gives, along a dim whose index ``i`` holds
    ``atoms[i]``, the old index each new index is or copies and, for a new one, its new unit (0..;
    -1 for an old index), or None where nothing is added.

    A new unit's entries are laid out like its template's, so each atom of the template has a
    counterpart in the new unit, as fresh producer channels would have. Where a grown group's unit
    merges several channels of one producer (a grouped convolution's whole group, a reshape's grid),
    the coupling depends on the channel counts themselves, and the result is analysed afresh."""
    if _added_tensors(analysis.gm, gm) != set() or _merges_own_channels(analysis, place):
        return analyze(gm, example_inputs)
    roots = analysis.roots
    new_atom = _NewAtoms(analysis.space.count)

    def placed_atoms(vector: torch.Tensor) -> torch.Tensor:
        placed = place(vector, "a tensor")
        if placed is None:
            return vector
        source, new = placed
        out = vector[source]
        at = (new >= 0).nonzero().flatten()
        out[at] = new_atom(new[at], out[at])
        return out

    def relabel(labels: torch.Tensor) -> torch.Tensor:
        small = compress(labels)
        shape = list(labels.shape)
        changed = False
        for d in range(small.dim()):
            if small.shape[d] == 1:
                continue
            rows = small.movedim(d, 0).reshape(small.shape[d], -1)
            none = int(rows.max()) + 1
            first = torch.where(rows >= 0, rows, none).min(1).values  # an index's channel, if any
            first = torch.where(first == none, -1, first)
            placed = place(first, "a tensor")
            if placed is None:
                continue
            source, new = placed
            small = small.index_select(d, source)
            # a new index holds the counterparts of its template's atoms (those of the template's unit)
            at = [1] * small.dim()
            at[d] = -1
            unit = torch.where(first >= 0, roots[first.clamp(min=0)], -1)[source].reshape(at)
            grown = (new.reshape(at) >= 0) & (small >= 0) & (roots[small.clamp(min=0)] == unit)
            where = grown.nonzero(as_tuple=True)
            small = small.clone()
            small[where] = new_atom(new.reshape(at).expand(small.shape)[where], small[where])
            shape[d], changed = small.shape[d], True
        return expand_compressed(small.expand(shape)) if changed else labels

    placed_atoms, relabel = _shared(placed_atoms), _shared(relabel)
    labels = {name: _map_nest(v, relabel) for name, v in analysis.labels.items()}
    members = [_with_atoms(m, placed_atoms(m.atoms)) for m in analysis.space.members]
    producers = [_with_atoms(p, placed_atoms(p.atoms)) for p in analysis.space.producers]
    all_roots = torch.cat([roots, new_atom.roots()])
    return _derived(analysis, gm, labels, members, producers, len(all_roots), all_roots, example_inputs)


def _merges_own_channels(analysis: Analysis, place: Callable) -> bool:
    """Whether a producer whose channels grow has two channels in one unit."""
    for p in analysis.space.producers:
        if place(p.atoms, "a tensor") is not None:
            roots = analysis.roots[p.atoms]
            if len(torch.unique(roots)) < len(roots):
                return True
    return False


class _NewAtoms:
    """Atoms for new units: one per (new unit, template atom), numbered from ``first``; a new unit's
    first atom is the root of all of its atoms."""

    def __init__(self, first: int):
        self.first = first
        self.ids: dict[tuple[int, int], int] = {}
        self.root_of_unit: dict[int, int] = {}
        self.unit_of: list[int] = []

    def __call__(self, units: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
        pairs, inverse = torch.unique(torch.stack([units, templates]), dim=1, return_inverse=True)
        out = []
        for k, a in pairs.t().tolist():
            if (k, a) not in self.ids:
                self.ids[(k, a)] = atom = self.first + len(self.unit_of)
                self.unit_of.append(k)
                self.root_of_unit.setdefault(k, atom)
            out.append(self.ids[(k, a)])
        return torch.tensor(out, dtype=torch.long)[inverse]

    def roots(self) -> torch.Tensor:
        return torch.tensor([self.root_of_unit[k] for k in self.unit_of], dtype=torch.long)


def _derived(analysis: Analysis, gm: torch.fx.GraphModule, labels: dict[str, Any], members: list[Member],
             producers: list[Producer], count: int, roots: torch.Tensor, example_inputs: Any) -> Analysis:
    """The analysis of ``gm`` from the relabelled labels, members and producers of ``analysis``."""
    sized = [n.name for n in gm.graph.nodes if n.op == "get_attr" or n.target in CONSTANT_FILLS]  # see GRID_LIMIT
    if any(_crosses_grid_limit(analysis.labels[name], labels[name]) for name in sized if name in labels):
        return analyze(gm, example_inputs)
    old = analysis.space
    space = LabelSpace(count=count, blocked=dict(old.blocked), inexact=dict(old.inexact), members=members,
                       producers=producers, producer_nodes=set(old.producer_nodes), aliases=dict(old.aliases))
    space.uf.add(count)
    derived = assemble(gm, space, labels, roots)
    derived.tainted = set(analysis.tainted)
    derived.layers = [dataclasses.replace(layer, nodes=list(layer.nodes), modules=list(layer.modules),
                                          groups=list(layer.groups)) for layer in analysis.layers]  # the same branches
    return derived


def _with_atoms(record, atoms: torch.Tensor):
    """A copy of a Member or Producer with other atoms."""
    if atoms is record.atoms:
        return record
    new = object.__new__(type(record))
    new.__dict__.update(record.__dict__, atoms=atoms)
    return new


def _shared(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn(t, ...)``, giving one result for every view of the same labels ``t``: tensors that shared
    their labels (a conv's output and its BatchNorm's, a weight and its bias) still share them, as
    the analysis expects."""
    done: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def once(t: torch.Tensor, *args) -> torch.Tensor:
        key = view_key(t)
        if key not in done:  # the entry holds ``t``, so that no other tensor takes its address
            done[key] = (t, fn(t, *args))
        return done[key][1]

    return once


def _map_nest(value: Any, fn: Relabel) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_nest(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_nest(v, fn) for k, v in value.items()}
    return value


def _crosses_grid_limit(before: Any, after: Any) -> bool:
    """Whether a tensor crosses the size above which tensors used directly get no atom per entry."""
    if isinstance(before, torch.Tensor):
        return (before.numel() > GRID_LIMIT) != (after.numel() > GRID_LIMIT)
    if isinstance(before, (list, tuple)):
        return any(_crosses_grid_limit(b, a) for b, a in zip(before, after))
    if isinstance(before, dict):
        return any(_crosses_grid_limit(b, after[k]) for k, b in before.items())
    return False


def _added_tensors(before: torch.fx.GraphModule, after: torch.fx.GraphModule) -> set[str] | None:
    """The parameters and buffers ``after`` has beyond those of ``before``, if it has the same
    nodes, modules read by the same channel rules, and other tensors (in the same order); else None."""
    old, new = list(before.graph.nodes), list(after.graph.nodes)
    if [(n.name, n.op) for n in old] != [(n.name, n.op) for n in new]:
        return None
    if any(a.target is not b.target and a.target != b.target for a, b in zip(old, new)):
        return None
    was, now = dict(before.named_modules(remove_duplicate=False)), dict(after.named_modules(remove_duplicate=False))
    # a module replaced by one its rule reads alike (nn.MultiheadAttention by PrunedMultiheadAttention)
    if any(find_rule(n, before, was[n.target]) is not find_rule(n, after, now[n.target]) for n in old if n.op == "call_module"):
        return None
    kept, grown = _tensor_names(was), _tensor_names(now)
    added = set(grown) - set(kept)
    return added if [k for k in grown if k not in added] == kept else None


def _tensor_names(modules: dict[str, torch.nn.Module]) -> list[str]:
    """Every parameter and buffer name, as ``named_parameters`` then ``named_buffers`` list them."""
    def names(table: str) -> list[str]:
        return [f"{path}.{k}" if path else k for path, m in modules.items() for k, t in getattr(m, table).items()
                if t is not None]
    return names("_parameters") + names("_buffers")
