"""Linear: out[..., o] <- sum_i W[o, i] * x[..., i]; input feature i owns column i.

``F.linear`` on a parameter (a module that passes its weight to a function) is the same; on a
computed weight it is the contraction x[..., i] W[o, i].
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .contraction import contract
from .registry import RuleContext, rule


@rule(nn.Linear)
def linear(ctx: RuleContext, x: torch.Tensor) -> torch.Tensor:  # out[o] <- W[o, :] @ x
    weight = ctx.param_name("weight")
    ctx.member(weight, 1, ctx.space.per_index(x, -1), "in", input_dim=-1)
    out = ctx.produce(weight, ctx.module.out_features, -1)
    atoms = ctx.space.owned(weight, "out", ctx.module.out_features)
    ctx.member(weight, 0, atoms, "out")
    ctx.module_member("bias", 0, atoms, "out")
    return out


@rule(F.linear)
def linear_function(ctx: RuleContext, x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    node = ctx.node.args[1] if len(ctx.node.args) > 1 else ctx.node.kwargs.get("weight")
    if not (isinstance(node, torch.fx.Node) and node.op == "get_attr"):
        batch = "abcdefgh"[:x.dim() - 1]
        out = contract(ctx, [(x, batch + "i", ctx.node.args[0]), (weight, "oi", node)], batch + "o")
    else:  # out[o] <- W[o, :] @ x, W a parameter
        owner = ctx.space.canonical(node.target)
        ctx.member(owner, 1, ctx.space.per_index(x, -1), "in", input_dim=-1)
        out = ctx.produce(owner, weight.shape[0], -1, name=owner.rpartition(".")[0] or owner)
        atoms = ctx.space.owned(owner, "out", weight.shape[0])
        ctx.member(owner, 0, atoms, "out")
    if isinstance(bias, torch.Tensor):  # a parameter (its own producer) or computed from one
        ctx.space.union(bias.expand(out.shape), out)
    return out
