"""Growth that keeps the function: new channels in a group, new residual blocks after a layer.

A new channel gets new entries in every tensor of its group, laid out like the group's other
channels (after the last one, in every block: an LSTM's gate blocks, a flattened map's columns).
Its producers compute something; every weight that reads it starts at zero ("random"), or it
copies an existing channel whose readers are split in two halves ("split", as Net2Net). Either way
the model computes what it did. A new residual block copies a layer's branch with fresh
parameters and its output is zero: its last BatchNorm starts at zero, or a gate does.
"""
from __future__ import annotations

import copy
import itertools
import operator
from collections.abc import Mapping as MappingType
from typing import Any

import torch
import torch.fx
from torch import nn

from fxprune.passes.resize_modules import resize_modules
from fxprune.passes.rewrite_shapes import Shapes, rewrite_shapes
from fxprune.passes.slice_parameters import replace_tensors

from .analysis import Analysis, analyze
from .collection import gc_paused
from .compact import verify_shapes
from .derive import grown_analysis
from .errors import CompactError, GrowError, TraceError
from .labels import compress, view_key
from .layers import Layer
from .mapping import Mapping, TensorMap, rewrite_mapping
from .trace import LAYER_NAME, propagate_shapes

READS = ("in", "read")  # roles whose new entries decide whether anything sees a new channel
INITS = ("random", "split")


@gc_paused()
def grow(model: nn.Module, example_inputs: Any, widen: MappingType[str, int] | None = None,
         insert: MappingType[str, "str | nn.Module"] | None = None, init: str = "random", seed: int = 0,
         analysis: Analysis | None = None, return_analysis: bool = False) -> tuple:
    """A larger model that computes what ``model`` computes, and the mapping of its tensors.

    ``widen={group: n}`` adds ``n`` channels to each named prunable group; ``init`` is "random"
    (producers' new weights drawn with the spread of the existing ones, readers' new weights zero)
    or "split" (each new channel copies a random existing one and the readers of both get half the
    weights). ``insert={layer: template}`` adds a residual block right after the add of each named
    layer (``analysis.layers``): "copy" copies that layer's branch with re-initialised modules, an
    ``nn.Module`` is used as the branch. The new block's output starts at zero. ``model`` is not
    changed.

    ``return_analysis=True`` returns ``(result, mapping, analysis)``, the analysis equal to
    ``analyze(result, example_inputs)``: derived from ``analysis`` without tracing again when only
    groups are widened, computed afresh when blocks are inserted.
    """
    if init not in INITS:
        raise GrowError(f"init must be one of {INITS}, got {init!r}")
    analysis = analysis if analysis is not None else analyze(model, example_inputs)
    generator = torch.Generator().manual_seed(seed)
    added = _added_units(analysis, dict(widen or {}))
    layout = _Layout(analysis, added, generator)
    grown = _grown_tensors(analysis, layout, init, generator)
    gm = replace_tensors(analysis.gm, lambda name, t: grown[name][0] if name in grown else None)
    shapes = Shapes(analysis.labels, lambda name, dim: layout.of_labels(analysis.labels[name], dim))
    resize_modules(gm, analysis.gm, shapes)
    rewrite_shapes(gm, shapes)
    try:
        verify_shapes(gm, shapes, example_inputs)
    except CompactError as e:  # a layout the placement rule does not cover (a unit split across tensors)
        raise GrowError(f"cannot widen {', '.join(repr(analysis.groups[gi].name) for gi in added)}: {e}") from e
    mapping = rewrite_mapping(gm, analysis.gm, {name: index for name, (_, index) in grown.items()}, analysis.space.aliases)
    for name, template in (insert or {}).items():
        _insert_block(gm, _layer(analysis, name), template, mapping)
    if insert:
        try:
            propagate_shapes(gm, example_inputs)
        except TraceError as e:
            raise GrowError(f"the blocks inserted after {', '.join(map(repr, insert))} do not keep the shape of "
                            f"their layer's output: {e}") from e
    if not return_analysis:
        return gm, mapping
    grown = analyze(gm, example_inputs) if insert else \
        grown_analysis(analysis, gm, layout.place, example_inputs)
    return gm, mapping, grown


def _added_units(analysis: Analysis, widen: dict[str, int]) -> dict[int, int]:
    """Group index -> channels to add."""
    names = {g.name: i for i, g in enumerate(analysis.groups)}
    out = {}
    for name, n in widen.items():
        if name not in names:
            raise GrowError(f"widen names no channel group: '{name}'")
        g = analysis.groups[names[name]]
        if not isinstance(n, int) or n < 0:
            raise GrowError(f"widen['{name}'] must be a non-negative int, got {n!r}")
        if not g.prunable:
            raise GrowError(f"group '{name}' cannot grow: {g.reason}")
        if g.size < 2:  # a single channel cannot be told apart from a size-1 dim in every tensor
            raise GrowError(f"group '{name}' has a single channel; fxprune grows groups of two or more")
        if n:
            out[names[name]] = n
    return out


def _templates(analysis: Analysis, added: dict[int, int], generator: torch.Generator) -> dict[int, torch.Tensor]:
    """Per grown group, the channels that its new ones copy: drawn among those that share every
    tensor with the group's last channel, after which the new ones go."""
    vectors = list({view_key(m.atoms): m.atoms for m in analysis.space.members}.values())  # shared atoms count once
    atoms = torch.cat(vectors) if vectors else torch.zeros(0, dtype=torch.long)
    member = torch.repeat_interleave(torch.arange(len(vectors)), torch.tensor([v.shape[0] for v in vectors], dtype=torch.long))
    member, atoms = member[atoms >= 0], atoms[atoms >= 0]
    roots = analysis.roots[atoms]
    group, unit = analysis.group_of[roots], analysis.unit_in[roots]
    out = {}
    for gi, n in added.items():
        size = analysis.groups[gi].size
        here = group == gi
        m, u = member[here], unit[here]
        with_last = torch.unique(m[u == size - 1])  # the tensors that hold the last channel
        seen = torch.zeros(len(vectors), size, dtype=torch.bool)
        seen[m, u] = True
        allowed = seen[with_last].all(0)
        choices = allowed.nonzero().flatten()
        out[gi] = choices[torch.randint(len(choices), (n,), generator=generator)]
    return out


class _Layout:
    """Where the new channels go along one dim of a tensor: the old index of each new index (-1:
    new) and, for a new one, the old index of the channel it copies."""

    def __init__(self, analysis: Analysis, added: dict[int, int], generator: torch.Generator):
        self.analysis, self.added = analysis, added
        self.templates = _templates(analysis, added, generator)
        self.first_new = dict(zip(added, itertools.accumulate([0, *added.values()])))  # a group's first new unit
        self.cache: dict[tuple, torch.Tensor] = {}
        self.kept: list[torch.Tensor] = []
        self.placed: dict[tuple, tuple] = {}  # by the atoms viewed
        self.grows = torch.isin(analysis.group_of, torch.tensor(list(added), dtype=torch.long))  # per unit root

    def place(self, atoms: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(source, new unit) along a dim whose index i holds atom ``atoms[i]``: for each new index,
        the old index it is or copies, and which new unit it holds (numbered over all groups from
        0; -1 for an old index). None where no channel is added along the dim."""
        placed = self.of_atoms(atoms, where)
        return None if placed is None else placed[1:]

    def of_atoms(self, atoms: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(index, source, new unit) along a dim whose index i holds atom ``atoms[i]`` (-1: none), or
        None where no channel is added along the dim."""
        key = view_key(atoms)
        if key not in self.placed:  # the entry holds ``atoms``, so that no other tensor takes its address
            self.placed[key] = (atoms, self._place(atoms, where))
        return self.placed[key][1]

    def _place(self, atoms: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.analysis
        roots = torch.where(atoms >= 0, a.roots[atoms.clamp(min=0)], 0)
        if not bool((self.grows[roots] & (atoms >= 0)).any()):
            return None
        group = torch.where(atoms >= 0, a.group_of[roots], -1)
        unit = torch.where(atoms >= 0, a.unit_in[roots], -1)
        present = set(torch.unique(group).tolist())
        after: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # old index -> what the new indices after it copy
        for gi, n in self.added.items():
            if gi not in present:
                continue
            positions = (group == gi).nonzero().flatten()
            for last, sources, units in self._insertions(positions, unit[positions], gi, n, where):
                after.setdefault(last, []).append((sources, units + self.first_new[gi]))
        index, source, new_unit, start = [], [], [], 0
        for last in sorted(after):
            new = torch.cat([s for s, _ in after[last]])
            kept = torch.arange(start, last + 1)
            index += [kept, torch.full((len(new),), -1)]
            source += [kept, new]
            new_unit += [torch.full((len(kept),), -1), torch.cat([u for _, u in after[last]])]
            start = last + 1
        rest = torch.arange(start, len(atoms))
        return torch.cat(index + [rest]), torch.cat(source + [rest]), torch.cat(new_unit + [torch.full((len(rest),), -1)])

    def of_labels(self, labels: torch.Tensor, dim: int) -> torch.Tensor:
        """The old index of each new index along ``dim`` of a tensor with these labels."""
        key = (view_key(labels), dim)
        if key not in self.cache:
            self.kept.append(labels)  # so that no other tensor takes its address
            small = compress(labels)
            if small.shape[dim] == 1:  # no channels along dim (groups of one channel do not grow)
                self.cache[key] = torch.arange(labels.shape[dim])
            else:
                rows = small.movedim(dim, 0).reshape(small.shape[dim], -1)
                none = int(rows.max()) + 1
                first = torch.where(rows >= 0, rows, none).min(1).values  # a position's channel, if any
                placed = self.of_atoms(torch.where(first == none, -1, first), "a tensor")
                self.cache[key] = torch.arange(labels.shape[dim]) if placed is None else placed[0]
        return self.cache[key]

    def _insertions(self, positions, units, gi, n, where) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """After each run of indices of the group's last unit: (the run's last index, the old
        indices the new units copy: for each template unit, its run of the same length in the same
        block (after the previous run of the last unit), else its nearest one; and which of the
        group's new units each of them holds)."""
        g = self.analysis.groups[gi]
        starts = torch.ones(len(units), dtype=torch.bool)  # a run: consecutive indices of one unit
        starts[1:] = (units[1:] != units[:-1]) | (positions[1:] != positions[:-1] + 1)
        first = starts.nonzero().flatten()
        end = torch.cat([first[1:], torch.tensor([len(units)])])
        run_unit, length = units[first], end - first
        templates, runs = self.templates[gi], torch.arange(len(run_unit))
        out, previous = [], -1
        for r in (run_unit == g.size - 1).nonzero().flatten().tolist():
            same = (run_unit[None, :] == templates[:, None]) & (length[None, :] == length[r])  # template x run
            missing = (~same.any(1)).nonzero().flatten()
            if len(missing):
                raise GrowError(f"cannot widen group '{g.name}': in {where} its channel {int(templates[missing[0]])} "
                                f"has no run of {int(length[r])} indices like channel {g.size - 1}")
            block = torch.where(same & (runs > previous) & (runs < r), runs, -1).max(1).values  # in the same block
            nearest = torch.where(same, (runs - r).abs() * 2 + (runs > r).long(), len(runs) * 4).argmin(1)
            c = torch.where(block >= 0, block, nearest)  # (an LSTM's gate block), else the nearest
            n = int(length[r])
            sources = positions[(first[c][:, None] + torch.arange(n)).reshape(-1)]
            out.append((int(positions[end[r] - 1]), sources, torch.arange(len(templates)).repeat_interleave(n)))
            previous = r
        return out


def _grown_tensors(analysis: Analysis, layout: _Layout, init: str, generator: torch.Generator):
    """Canonical tensor name -> (new tensor, {dim: old index or -1})."""
    dims: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, set[str]]]] = {}
    for m in analysis.space.members:
        per_dim = dims.setdefault(m.owner, {})
        if m.dim not in per_dim:
            placed = layout.of_atoms(m.atoms, f"'{m.owner}' (dim {m.dim})")
            per_dim[m.dim] = None if placed is None else (*placed[:2], set())
        if per_dim[m.dim] is not None:
            per_dim[m.dim][2].add(m.role)
    tensors = dict(analysis.gm.named_parameters(remove_duplicate=False)) | dict(analysis.gm.named_buffers(remove_duplicate=False))
    out = {}
    for owner, per_dim in dims.items():
        grown = {d: v for d, v in per_dim.items() if v is not None and bool((v[0] < 0).any())}
        if not grown:
            continue
        t = tensors[owner].detach()
        both = [d for d, v in grown.items() if "out" in v[2] and v[2] & set(READS)]
        if init == "split" and both:  # halving its reads would halve what it produces (tied weights)
            raise GrowError(f"init='split' cannot widen '{owner}' (dim {both[0]}): the same entries produce and "
                            "read the new channels (tied weights); use init='random'")
        # producers' entries first, readers' last: an entry both produces and reads a new channel is a read
        for d, (index, source, roles) in sorted(grown.items(), key=lambda kv: bool(kv[1][2] & set(READS))):
            t = _grow_dim(t, d, index, source, roles, init, generator)
        out[owner] = (t, {d: v[0] for d, v in grown.items()})
    return out


def _grow_dim(t: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor, roles: set[str], init: str,
              generator: torch.Generator) -> torch.Tensor:
    new = index < 0
    shape = [-1 if d == dim else 1 for d in range(t.dim())]
    grown = t.index_select(dim, source)  # a new entry copies its template
    if roles & set(READS):
        if init == "split":  # W x_c = (W/k) x_c + ... + (W/k) x_c', with k copies of channel c in all
            copies = torch.bincount(source, minlength=t.shape[dim])
            return grown / copies[source].to(t.dtype).reshape(shape)
        return grown.masked_fill(new.reshape(shape), 0)
    if "out" in roles and init == "random" and t.dim() > 1:  # new filters drawn, only those
        at = new.nonzero().flatten()
        size = list(grown.shape)
        size[dim] = len(at)
        noise = torch.randn(size, generator=generator, dtype=t.dtype) * t.std().nan_to_num(0)
        return grown.index_copy_(dim, at, noise)
    if "out" in roles and init == "random":  # a bias
        return grown.masked_fill(new.reshape(shape), 0)
    return grown


def _layer(analysis: Analysis, name: str) -> Layer:
    try:
        return analysis.layer(name)
    except KeyError:
        raise GrowError(f"insert names no removable layer: '{name}' (analysis.layers lists them)") from None


def _insert_block(gm: torch.fx.GraphModule, layer: Layer, template: "str | nn.Module", mapping: Mapping) -> None:
    """Add y' = y + G(y) after ``layer``'s add y, with G = a copy of its branch (``template`` "copy")
    or ``template``; G's output starts at zero."""
    nodes = {n.name: n for n in gm.graph.nodes}
    add = nodes[layer.add]
    block = layer.name.partition(":")[0] or layer.add
    path = _free_path(gm, f"{block}_grown")
    users = list(add.users)
    if isinstance(template, nn.Module):
        gm.add_submodule(path, copy.deepcopy(template))
        with gm.graph.inserting_after(add):
            out = gm.graph.call_module(path, (add,))
        zeroed = False
    elif template == "copy":
        out, zeroed = _copy_branch(gm, nodes, layer, add, block, path)
    else:
        raise GrowError(f"insert['{layer.name}'] must be \"copy\" or an nn.Module, got {template!r}")
    if not zeroed:
        gate = f"{path}.gate" if isinstance(template, str) else f"{path}_gate"
        owner, _, name = gate.rpartition(".")
        _module(gm, owner).register_parameter(name, nn.Parameter(torch.zeros(())))
        with gm.graph.inserting_after(out):
            gate_node = gm.graph.get_attr(gate)
        with gm.graph.inserting_after(gate_node):
            out = gm.graph.call_function(operator.mul, (out, gate_node))
    with gm.graph.inserting_after(out):
        new_add = gm.graph.call_function(operator.add, (add, out))
    stack = add.meta.get("nn_module_stack", {})
    new_add.meta["nn_module_stack"] = {**{k: v for k, v in stack.items() if not _inside(v[0], block)},
                                       path: (path, nn.Module)}
    for user in users:
        user.replace_input_with(add, new_add)
    for name, _ in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if name.startswith(path):
            mapping[name] = TensorMap(None)
    gm.graph.lint()
    gm.recompile()


def _copy_branch(gm, nodes, layer: Layer, add, block: str, path: str) -> tuple[torch.fx.Node, bool]:
    """Copy the branch's nodes after ``add``, reading ``add`` where they read the skip; modules are
    copied under ``path`` and re-initialised. Returns the copy's output and whether it is zeroed."""
    out_node = nodes[layer.branch_out]
    skip = next(a for a in add.args[:2] if a is not out_node)  # a block inserted before may stand there now
    env = {skip: add}
    renamed: dict[str, str] = {}
    last = add
    for name in layer.nodes:
        n = nodes[name]
        with gm.graph.inserting_after(last):
            copy_ = gm.graph.node_copy(n, lambda a: env.get(a, a))
        copy_.meta.pop(LAYER_NAME, None)  # a layer inside the copy gets a name of its own
        if n.op in ("call_module", "get_attr"):
            copy_.target = renamed.setdefault(n.target, _copy_target(gm, n, block, path))
        env[n] = last = copy_
    out = env[nodes[layer.branch_out]]
    if out.op == "call_module":
        bn = gm.get_submodule(out.target)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.affine:
            nn.init.zeros_(bn.weight)
            nn.init.zeros_(bn.bias)
            return out, True
    return out, False


def _copy_target(gm: torch.fx.GraphModule, n: torch.fx.Node, block: str, path: str) -> str:
    target = f"{path}{n.target[len(block):]}" if _inside(n.target, block) else f"{path}.{n.target.replace('.', '_')}"
    owner, _, name = target.rpartition(".")
    if n.op == "call_module":
        module = copy.deepcopy(gm.get_submodule(n.target))
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        gm.add_submodule(target, module)
    else:
        src_owner, _, src_name = n.target.rpartition(".")
        value = getattr(gm.get_submodule(src_owner), src_name)
        holder = _module(gm, owner)
        if isinstance(value, nn.Parameter):
            holder.register_parameter(name, nn.Parameter(value.detach().clone(), value.requires_grad))
        else:
            holder.register_buffer(name, value.detach().clone() if isinstance(value, torch.Tensor) else value)
    return target


def _module(gm: torch.fx.GraphModule, path: str) -> nn.Module:
    """The module at ``path``, created empty (with its parents) where missing."""
    try:
        return gm.get_submodule(path)
    except AttributeError:
        gm.add_submodule(path, nn.Module())
        return gm.get_submodule(path)


def _inside(path: str, block: str) -> bool:
    return path == block or path.startswith(block + ".")


def _free_path(gm: torch.fx.GraphModule, base: str) -> str:
    path, i = base, 1
    while True:
        try:
            gm.get_submodule(path)
        except AttributeError:
            return path
        i += 1
        path = f"{base}{i}"
