"""Keep only the surviving channels of every parameter and buffer: W' = W[kept_0][:, kept_1]..."""
from __future__ import annotations

import itertools

import torch
import torch.fx
from torch import nn

from fxprune.copying import copy_graph_module
from fxprune.masks import Plan


def kept_indices(plan: Plan) -> dict[str, dict[int, torch.Tensor]]:
    """For each tensor name, the indices kept along each of its channel dimensions."""
    out: dict[str, dict[int, torch.Tensor]] = {}
    for i, m in enumerate(plan.analysis.space.members):
        if plan.size_at(i) < len(m.atoms):
            out.setdefault(m.owner, {})[m.dim] = plan.kept_at(i).nonzero().flatten()
    return out


def slice_parameters(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose parameters and buffers hold only the kept channels."""
    index = kept_indices(plan)

    def sliced(name: str, t: torch.Tensor) -> torch.Tensor | None:
        if name not in index:
            return None
        for dim, idx in sorted(index[name].items()):
            t = t.index_select(dim, idx)
        return t

    return replace_tensors(gm, sliced)


def replace_tensors(gm: torch.fx.GraphModule, new_value) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose tensor ``name`` holds ``new_value(name, tensor)`` (None: a copy).

    Every tensor of the copy is new storage, written once; a tensor with several names stays one.
    """
    names = {}
    for name, t in itertools.chain(gm.named_parameters(remove_duplicate=False), gm.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), name)

    def replaced(t: torch.Tensor) -> torch.Tensor:
        new = new_value(names[id(t)], t.detach()) if id(t) in names else None
        new = t.detach().clone() if new is None else new
        return nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new

    return copy_graph_module(gm, replaced)
