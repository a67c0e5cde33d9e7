"""Zero masked channels where they leave their producer: the reference semantics of pruning.

A producer's output is multiplied by its channel mask (after a BatchNorm that directly follows it).
A module whose channels live inside it (an RNN's hidden units, an attention head) is wrapped in a
:class:`~fxprune.modules.masked.MaskedModule` that zeroes the parameter entries of its masked units
and their positions in its outputs.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_map

from fxprune.errors import CompactError
from fxprune.labels import compress
from fxprune.masks import Plan
from fxprune.modules.gate import GatedBatchNorm
from fxprune.modules.masked import MaskedModule
from fxprune.modules.recurrent import RecurrentStack, renamed
from fxprune.rules.registry import element_read
from fxprune.trace import ALWAYS_LEAF


def zero_point(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node:
    """Where a producer's channels are zeroed: after a BatchNorm (gated or not) that directly follows it."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module" and users[0].args[:1] == (node,):
        module = gm.get_submodule(users[0].target)
        if isinstance(module.module if isinstance(module, GatedBatchNorm) else module, nn.modules.batchnorm._BatchNorm):
            return users[0]
    return node


def mask_channels(gm: torch.fx.GraphModule, plan: Plan, compacted: bool = False) -> None:
    """Zero, in place, every channel that a producer of ``plan`` masks.

    ``compacted`` says that ``gm`` already holds only the channels ``plan`` keeps: then only the
    kept channels that their producer masks are zeroed.
    """
    zeroed = torch.zeros(plan.analysis.space.count, dtype=torch.bool)
    for p, mask in plan.producer_masks.values():
        zeroed[p.atoms[~mask]] = True
    if compacted:
        zeroed &= plan.keep_atom
    if not bool(zeroed.any()):
        return
    nodes = {n.name: n for n in gm.graph.nodes}
    inside: dict[str, list] = {}  # module -> its producers, over every call
    for p, _ in plan.producer_masks.values():
        node = nodes[p.node]
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), ALWAYS_LEAF):
            inside.setdefault(node.target, []).append(p)
            continue
        atoms = p.atoms[plan.keep_atom[p.atoms]] if compacted else p.atoms
        keep = ~zeroed[atoms]
        if not bool(keep.all()):
            _multiply_output(gm, node, p.dim, keep, p.name)
    for target, producers in inside.items():
        _mask_inside(gm, target, nodes[producers[0].node], plan, zeroed, producers, compacted)
    gm.graph.lint()
    gm.recompile()


def _multiply_output(gm: torch.fx.GraphModule, node: torch.fx.Node, dim: int, keep: torch.Tensor, name: str) -> None:
    at = zero_point(gm, node)
    meta = at.meta["tensor_meta"]
    shape = [1] * len(meta.shape)
    shape[dim] = -1
    attr_name = _free_name(gm, f"{name.replace('.', '_')}_channel_mask")
    gm.register_buffer(attr_name, keep.to(meta.dtype).reshape(shape))
    with gm.graph.inserting_after(at):
        attr = gm.graph.get_attr(attr_name)
    with gm.graph.inserting_after(attr):
        masked = gm.graph.call_function(torch.mul, (at, attr))
    at.replace_all_uses_with(masked, delete_user_cb=lambda user: user is not masked)
    masked.meta["tensor_meta"] = meta


def _mask_inside(gm, target: str, node, plan: Plan, zeroed: torch.Tensor, producers: list, compacted: bool) -> None:
    """Wrap module ``target`` so that its producers' zeroed units vanish inside it; ``node`` is one
    of its calls (every call has the same labels: the module owns its channels)."""
    own = torch.zeros_like(zeroed)
    for p in producers:
        own[p.atoms] = zeroed[p.atoms]
    module = gm.get_submodule(target)
    names = dict(module.named_parameters(remove_duplicate=False))
    before = plan.analysis.gm.get_submodule(target)
    moved = renamed(before, module) if isinstance(module, RecurrentStack) and module is not before else {}
    param_masks: dict[str, torch.Tensor] = {}
    prefix, calls, seen = f"{target}.", {p.node for p in producers}, set()
    for m in plan.analysis.space.members:
        local = m.owner[len(prefix):] if m.owner.startswith(prefix) else None
        if m.node not in calls or local is None or (local, m.dim) in seen:
            continue
        local = moved.get(local, local)
        seen.add((local, m.dim))
        atoms = m.atoms[plan.kept(m.atoms)] if compacted else m.atoms
        keep = _not_in(atoms, own)
        if bool(keep.all()):
            continue
        if local not in names:
            raise CompactError(f"cannot mask units inside module '{target}': it has no parameter '{local}'")
        shape = [1] * names[local].dim()
        shape[m.dim] = -1
        mask = keep.to(names[local].dtype).reshape(shape)
        param_masks[local] = param_masks[local] * mask if local in param_masks else mask

    def output_mask(labels: Any) -> Any:
        if not isinstance(labels, torch.Tensor) or labels.dim() == 0:
            return labels
        labels = plan.surviving(labels) if compacted else compress(labels)  # broadcasts over any length
        return _not_in(labels, own).float()

    labels = plan.analysis.labels[node.name]
    if compacted and isinstance(labels, tuple):  # an unread state of a compacted RNN may have any width
        unmasked = lambda t: torch.ones(()) if isinstance(t, torch.Tensor) else t  # noqa: E731
        labels = tuple(v if element_read(node, i) else tree_map(unmasked, v) for i, v in enumerate(labels))
    outputs = tree_map(output_mask, labels)
    gm.set_submodule(target, MaskedModule(module, param_masks, outputs).train(module.training))


def _not_in(labels: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """Where ``labels`` hold no atom that ``atoms`` (a bool per atom) marks."""
    return ~torch.where(labels >= 0, atoms[labels.clamp(min=0)], False)


def _free_name(gm: torch.fx.GraphModule, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name
