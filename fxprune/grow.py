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
from .compact import verify_shapes
from .errors import CompactError, GrowError, TraceError
from .labels import compress
from .layers import Layer
from .mapping import Mapping, TensorMap, rewrite_mapping
from .trace import LAYER_NAME, propagate_shapes

READS = ("in", "read")  # roles whose new entries decide whether anything sees a new channel
INITS = ("random", "split")


def grow(model: nn.Module, example_inputs: Any, widen: MappingType[str, int] | None = None,
         insert: MappingType[str, "str | nn.Module"] | None = None, init: str = "random", seed: int = 0,
         analysis: Analysis | None = None) -> tuple[torch.fx.GraphModule, Mapping]:
    """A larger model that computes what ``model`` computes, and the mapping of its tensors.

    ``widen={group: n}`` adds ``n`` channels to each named prunable group; ``init`` is "random"
    (producers' new weights drawn with the spread of the existing ones, readers' new weights zero)
    or "split" (each new channel copies a random existing one and the readers of both get half the
    weights). ``insert={layer: template}`` adds a residual block right after the add of each named
    layer (``analysis.layers``): "copy" copies that layer's branch with re-initialised modules, an
    ``nn.Module`` is used as the branch. The new block's output starts at zero. ``model`` is not
    changed.
    """
    if init not in INITS:
        raise GrowError(f"init must be one of {INITS}, got {init!r}")
    analysis = analysis if analysis is not None else analyze(model, example_inputs)
    generator = torch.Generator().manual_seed(seed)
    added = _added_units(analysis, dict(widen or {}))
    layout = _Layout(analysis, added, generator)
    grown = _grown_tensors(analysis, layout, init, generator)
    gm = replace_tensors(analysis.gm, lambda name, t: grown[name][0] if name in grown else None)
    shapes = Shapes(analysis.labels, layout.of_labels)
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
            propagate_shapes(gm, example_inputs, owned=True)
        except TraceError as e:
            raise GrowError(f"the blocks inserted after {', '.join(map(repr, insert))} do not keep the shape of "
                            f"their layer's output: {e}") from e
    return gm, mapping


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


def _templates(analysis: Analysis, gi: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """The channels that ``n`` new ones of group ``gi`` copy: drawn among those that share every
    tensor with the group's last channel, after which the new ones go."""
    allowed = torch.ones(analysis.groups[gi].size, dtype=torch.bool)
    for m in analysis.space.members:
        roots = analysis.roots[m.atoms[m.atoms >= 0]]
        units = analysis.unit_in[roots[analysis.group_of[roots] == gi]]
        if bool((units == len(allowed) - 1).any()):
            allowed &= torch.isin(torch.arange(len(allowed)), units)
    choices = allowed.nonzero().flatten()
    return choices[torch.randint(len(choices), (n,), generator=generator)]


class _Layout:
    """Where the new channels go along one dim of a tensor: the old index of each new index (-1:
    new) and, for a new one, the old index of the channel it copies."""

    def __init__(self, analysis: Analysis, added: dict[int, int], generator: torch.Generator):
        self.analysis, self.added = analysis, added
        self.templates = {gi: _templates(analysis, gi, n, generator) for gi, n in added.items()}
        self.cache: dict[tuple[int, int], torch.Tensor] = {}

    def of_atoms(self, atoms: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, source) along a dim whose index i holds atom ``atoms[i]`` (-1: none)."""
        a = self.analysis
        roots = torch.where(atoms >= 0, a.roots[atoms.clamp(min=0)], 0)
        group = torch.where(atoms >= 0, a.group_of[roots], -1)
        unit = torch.where(atoms >= 0, a.unit_in[roots], -1)
        after: dict[int, list[torch.Tensor]] = {}  # old index -> what the new indices after it copy
        for gi, n in self.added.items():
            positions = (group == gi).nonzero().flatten()
            if len(positions):
                for last, sources in self._insertions(positions, unit[positions], gi, n, where):
                    after.setdefault(last, []).append(sources)
        index, source, start = [], [], 0
        for last in sorted(after):
            new = torch.cat(after[last])
            index += [torch.arange(start, last + 1), torch.full((len(new),), -1)]
            source += [torch.arange(start, last + 1), new]
            start = last + 1
        return torch.cat(index + [torch.arange(start, len(atoms))]), torch.cat(source + [torch.arange(start, len(atoms))])

    def of_labels(self, labels: torch.Tensor, dim: int) -> torch.Tensor:
        """The old index of each new index along ``dim`` of a tensor with these labels."""
        key = (id(labels), dim)
        if key not in self.cache:
            small = compress(labels)
            if small.shape[dim] == 1:  # no channels along dim (groups of one channel do not grow)
                self.cache[key] = torch.arange(labels.shape[dim])
            else:
                rows = small.movedim(dim, 0).reshape(small.shape[dim], -1)
                none = int(rows.max()) + 1
                first = torch.where(rows >= 0, rows, none).min(1).values  # a position's channel, if any
                self.cache[key] = self.of_atoms(torch.where(first == none, -1, first), "a tensor")[0]
        return self.cache[key]

    def _insertions(self, positions, units, gi, n, where) -> list[tuple[int, torch.Tensor]]:
        """After each run of indices of the group's last unit: (the run's last index, the old
        indices the new units copy: for each template unit, its run of the same length in the same
        block (after the previous run of the last unit), else its nearest one)."""
        g = self.analysis.groups[gi]
        starts = torch.ones(len(units), dtype=torch.bool)  # a run: consecutive indices of one unit
        starts[1:] = (units[1:] != units[:-1]) | (positions[1:] != positions[:-1] + 1)
        first = starts.nonzero().flatten()
        end = torch.cat([first[1:], torch.tensor([len(units)])])
        run_unit, length = units[first], end - first
        out, previous = [], -1
        for r in (run_unit == g.size - 1).nonzero().flatten().tolist():
            sources = []
            for t in self.templates[gi].tolist():
                same = ((run_unit == t) & (length == length[r])).nonzero().flatten()
                if not len(same):
                    raise GrowError(f"cannot widen group '{g.name}': in {where} its channel {t} has no run of "
                                    f"{int(length[r])} indices like channel {g.size - 1}")
                block = same[(same > previous) & (same < r)]  # in the same block (an LSTM's gate block)
                c = block[-1] if len(block) else same[torch.argmin((same - r).abs() * 2 + (same > r).long())]
                sources.append(positions[first[c]:end[c]])
            out.append((int(positions[end[r] - 1]), torch.cat(sources)))
            previous = r
        return out


def _grown_tensors(analysis: Analysis, layout: _Layout, init: str, generator: torch.Generator):
    """Canonical tensor name -> (new tensor, {dim: old index or -1})."""
    dims: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, set[str]]]] = {}
    for m in analysis.space.members:
        per_dim = dims.setdefault(m.owner, {})
        if m.dim not in per_dim:
            per_dim[m.dim] = (*layout.of_atoms(m.atoms, f"'{m.owner}' (dim {m.dim})"), set())
        per_dim[m.dim][2].add(m.role)
    tensors = dict(analysis.gm.named_parameters(remove_duplicate=False)) | dict(analysis.gm.named_buffers(remove_duplicate=False))
    out = {}
    for owner, per_dim in dims.items():
        grown = {d: v for d, v in per_dim.items() if bool((v[0] < 0).any())}
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
    if "out" in roles and init == "random" and t.dim() > 1:
        noise = torch.randn(grown.shape, generator=generator, dtype=t.dtype) * t.std().nan_to_num(0)
        return torch.where(new.reshape(shape), noise, grown)
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
