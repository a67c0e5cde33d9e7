"""Linear: out[..., o] <- sum_i W[o, i] * x[..., i]; input feature i owns column i."""
from __future__ import annotations

import torch
from torch import nn

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
