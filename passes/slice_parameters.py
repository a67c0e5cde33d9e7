"""Keep only the surviving channels of every parameter and buffer: W' = W[kept_0][:, kept_1]..."""
from __future__ import annotations

import copy
import itertools

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


def slice_parameters(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose parameters and buffers hold only the kept channels.

    Every tensor of the copy is new storage; each is written once (sliced, or cloned if whole).
    """
    index = kept_indices(plan)
    memo: dict[int, torch.Tensor] = {}
    named = itertools.chain(gm.named_parameters(remove_duplicate=False), gm.named_buffers(remove_duplicate=False))
    for name, t in named:
        if id(t) in memo:
            continue
        new = t.detach()
        for dim, idx in sorted(index.get(name, {}).items()):
            new = new.index_select(dim, idx)
        new = new.clone() if name not in index else new
        memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    return copy.deepcopy(gm, memo)
