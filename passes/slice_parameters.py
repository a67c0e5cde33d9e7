"""Keep only the surviving channels of every parameter and buffer: W' = W[kept_0][:, kept_1]..."""
from __future__ import annotations

import torch
import torch.fx
from torch import nn

from fxprune.masks import Plan


def kept_indices(plan: Plan) -> dict[str, dict[int, torch.Tensor]]:
    """For each tensor name, the indices kept along each of its channel dimensions."""
    out: dict[str, dict[int, torch.Tensor]] = {}
    for m in plan.analysis.space.members:
        keep = plan.kept(m.atoms)
        if not bool(keep.all()):
            out.setdefault(m.owner, {})[m.dim] = keep.nonzero().flatten()
    return out


def slice_parameters(gm: torch.fx.GraphModule, plan: Plan) -> None:
    """Replace each parameter and buffer of ``gm`` that has removed channels by its slice, in place."""
    for name, dims in kept_indices(plan).items():
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path)
        old = getattr(owner, attr)
        new = old.detach()
        for dim, index in sorted(dims.items()):
            new = new.index_select(dim, index)
        new = new.clone()
        if isinstance(old, nn.Parameter):
            setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            owner.register_buffer(attr, new, persistent=attr not in owner._non_persistent_buffers_set)
