"""Insert gates: one per channel group where ``apply_masks`` zeroes its channels, one per
removable layer on its branch's output.

A gate's values multiply the group's channels at every producer (after a BatchNorm that directly
follows it) and, inside a module that owns its units (an RNN, an attention), the parameter entries
and outputs of those units. Where a plain affine BatchNorm produces the gated output (a channel's
zero point, a branch's output), the gate scales its weight and bias instead
(:class:`~fxprune.modules.gate.GatedBatchNorm`): the same values, at the cost of a multiply of two
vectors rather than of the whole activation, forward and backward. The graph calls the
:class:`~fxprune.modules.gate.GateSet` of its gates first in every pass. With 0/1 values the gated model is ``apply_masks`` of the masks
``{gate.key: gate.hard()}``, except where all of a group inside a removable layer is gated off:
``apply_masks`` then removes the layer, while the gated branch still adds what follows the group
(a BatchNorm's bias).
"""
from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_flatten

from fxprune.analysis import Analysis
from fxprune.errors import MaskError
from fxprune.labels import compress
from fxprune.modules.gate import BATCH_NORMS, Gate, GatedBatchNorm, GatedModule, GateSet
from fxprune.trace import ALWAYS_LEAF

from .mask_channels import zero_point

GateFactory = Callable[[str, int], Gate]  # (group or layer name, number of units) -> gate


def insert_gates(analysis: Analysis, make_gate: GateFactory = Gate, groups: Iterable[str] | None = None,
                 layers: Iterable[str] | None = None, share_tensors: bool = False) -> torch.fx.GraphModule:
    """A copy of ``analysis.gm`` with a gate from ``make_gate`` on each named group (default: every
    prunable group) and each named layer (default: every removable layer). The gates are the
    submodules of ``result.gates``; ``gate.key`` is the name it stands for. ``share_tensors``: the
    copy's parameters and buffers are those of ``analysis.gm`` (nothing is copied; training the
    gated model trains it), for a caller that owns ``analysis.gm``."""
    tensors = itertools.chain(analysis.gm.parameters(), analysis.gm.buffers()) if share_tensors else ()
    gm = copy.deepcopy(analysis.gm, {id(t): t for t in tensors})
    names = [g.name for g in analysis.groups if g.prunable] if groups is None else list(groups)
    chosen = {_group_index(analysis, name): name for name in names}
    gm.add_submodule("gates", GateSet())
    with gm.graph.inserting_before(next(n for n in gm.graph.nodes if n.op != "placeholder")):
        gm.graph.call_module("gates", ())  # first in every pass: GateSet.forward
    paths = {}
    for gi, name in chosen.items():
        paths[gi] = _add_gate(gm, make_gate(name, analysis.groups[gi].size))
    nodes = {n.name: n for n in gm.graph.nodes}
    # layer gates first: a channel gate on a branch's output then sits inside its layer's gate
    for name in [layer.name for layer in analysis.layers] if layers is None else layers:
        layer = analysis.layer(name)
        path = _add_gate(gm, make_gate(layer.name, 1))
        out = nodes[layer.branch_out]
        if len(out.users) == 1 and _gate_norm(gm, out, path, 1, lambda channels: torch.zeros(channels, dtype=torch.long)):
            continue
        with gm.graph.inserting_after(out):
            gated = gm.graph.call_module(path, (out,))
        nodes[layer.add].replace_input_with(out, gated)
        gated.meta["tensor_meta"] = out.meta.get("tensor_meta")
    inside: dict[str, list] = {}
    for p in analysis.space.producers:
        gi = int(analysis.group_of[analysis.roots[p.atoms[0]]])
        if gi not in paths:
            continue
        node = nodes[p.node]
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), ALWAYS_LEAF):
            inside.setdefault(node.target, []).append(node)
            continue
        _gate_output(gm, node, paths[gi], analysis.unit_in[analysis.roots[p.atoms]], p.dim)
    for target, calls in inside.items():
        _gate_inside(gm, analysis, target, list(dict.fromkeys(calls)), paths)
    gm.graph.lint()
    gm.recompile()
    return gm


def gates_of(gm: nn.Module) -> list[Gate]:
    """The gates of a gated model."""
    return [m for m in gm.modules() if isinstance(m, Gate)]


def _group_index(analysis: Analysis, name: str) -> int:
    for i, g in enumerate(analysis.groups):
        if g.name == name:
            if not g.prunable:
                raise MaskError(f"group '{name}' cannot be gated: {g.reason}")
            return i
    raise MaskError(f"no channel group '{name}' to gate")


def _add_gate(gm: torch.fx.GraphModule, gate: Gate) -> str:
    base = "gates." + gate.key.replace(".", "_").replace(":", "__").replace("#", "_")
    path, i = base, 1
    while hasattr(gm.gates, path.partition(".")[2]):
        i += 1
        path = f"{base}_{i}"
    gm.add_submodule(path, gate.to(_device(gm)))
    return path


def _device(gm: torch.fx.GraphModule) -> torch.device:
    """Where the model's tensors are: gates and their unit indices go there too."""
    return next(itertools.chain(gm.parameters(), gm.buffers()), torch.empty(0)).device


def _gate_output(gm: torch.fx.GraphModule, node: torch.fx.Node, path: str, units: torch.Tensor, dim: int) -> None:
    at = zero_point(gm, node)
    if _gate_norm(gm, at, path, dim, lambda channels: units):
        return
    name = f"{path.replace('.', '_')}_units"
    i = 1
    while hasattr(gm, f"{name}_{i}"):
        i += 1
    gm.register_buffer(f"{name}_{i}", units.to(_device(gm), copy=True))
    with gm.graph.inserting_after(at):
        attr = gm.graph.get_attr(f"{name}_{i}")
    with gm.graph.inserting_after(attr):
        gated = gm.graph.call_module(path, (at, attr, dim))
    at.replace_all_uses_with(gated, delete_user_cb=lambda user: user is not gated)
    gated.meta["tensor_meta"] = at.meta.get("tensor_meta")


def _gate_norm(gm: torch.fx.GraphModule, node: torch.fx.Node, path: str, dim: int,
               units: Callable[[int], torch.Tensor]) -> bool:
    """Gate the output of ``node`` through its affine parameters if it is a BatchNorm gated along
    its channels (``units(channels)``: the gate's unit of each); whether it was."""
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    meta = node.meta.get("tensor_meta")
    if not isinstance(module, GatedBatchNorm):
        if type(module) not in BATCH_NORMS or not module.affine:
            return False
        module = GatedBatchNorm(module).train(module.training)
    if not hasattr(meta, "shape") or dim % len(meta.shape) != 1:
        return False
    gm.set_submodule(node.target, module)
    module.add_gate(units(module.module.num_features))
    with gm.graph.inserting_before(node):
        values = gm.graph.call_module(path, ())
    node.kwargs = {**node.kwargs, "gates": (*node.kwargs.get("gates", ()), values)}
    return True


def _gate_inside(gm, analysis: Analysis, target: str, calls: list[torch.fx.Node], paths: dict[int, str]) -> None:
    """Wrap module ``target`` in a GatedModule reading the gates of the groups its units are in."""
    order: list[int] = []  # gate positions in the wrapper's ``gates`` argument, by group index
    prefix, called = f"{target}.", {n.name for n in calls}
    params: dict[str, list] = {}
    seen = set()
    for m in analysis.space.members:
        if m.node not in called or not m.owner.startswith(prefix) or (m.owner, m.dim) in seen:
            continue
        seen.add((m.owner, m.dim))
        for site in _sites(analysis, m.atoms, paths, order):
            params.setdefault(m.owner[len(prefix):], []).append((site[0], m.dim, site[1]))
    outputs: dict[int, list] = {}
    leaves, _ = tree_flatten(analysis.labels[calls[0].name])
    for i, labels in enumerate(leaves):
        if isinstance(labels, torch.Tensor) and labels.dim():
            small = compress(labels)
            varying = [d for d in range(small.dim()) if small.shape[d] > 1]
            if len(varying) == 1:
                d = varying[0]
                row = small.movedim(d, 0).reshape(small.shape[d], -1)[:, 0]
                outputs[i] = [(g, d - labels.dim(), u) for g, u in _sites(analysis, row, paths, order)]
    module = gm.get_submodule(target)
    gm.set_submodule(target, GatedModule(module, params, outputs).to(_device(gm)).train(module.training))
    for node in calls:
        values = []
        for gi in order:
            with gm.graph.inserting_before(node):
                values.append(gm.graph.call_module(paths[gi], ()))
        node.kwargs = {**node.kwargs, "gates": tuple(values)}


def _sites(analysis: Analysis, atoms: torch.Tensor, paths: dict[int, str], order: list[int]) -> list[tuple[int, torch.Tensor]]:
    """Per gated group among ``atoms``: (its position in ``order``, the unit of each entry or -1)."""
    roots = torch.where(atoms >= 0, analysis.roots[atoms.clamp(min=0)], 0)
    group = torch.where(atoms >= 0, analysis.group_of[roots], -1)
    out = []
    for gi in torch.unique(group[group >= 0]).tolist():
        if gi in paths:
            if gi not in order:
                order.append(gi)
            out.append((order.index(gi), torch.where(group == gi, analysis.unit_in[roots], -1)))
    return out
