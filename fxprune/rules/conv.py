"""ConvNd and ConvTransposeNd, grouped and depthwise.

out[o] <- sum over the input channels of o's group. With groups == 1 the output channels are new
and input channel i owns the weight slice of i. With groups > 1 one unit is a whole group: its
input and output channels are removed together, which keeps every group the same size.
"""
from __future__ import annotations

import torch
from torch import nn

from .registry import RuleContext, rule


@rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv(ctx: RuleContext, x: torch.Tensor, *args) -> torch.Tensor:  # out[o] <- W[o, :] * x
    m, space = ctx.module, ctx.space
    weight = ctx.param_name("weight")
    x_in = space.per_index(x, 1)
    out = ctx.produce(weight, m.out_channels, 1)
    atoms = space.owned(weight, "out", m.out_channels)
    in_dim, out_dim = (0, 1) if m.transposed else (1, 0)
    if m.groups == 1:
        ctx.member(weight, in_dim, x_in, "in", input_dim=1)
        ctx.member(weight, out_dim, atoms, "out")
    else:
        per_in, per_out = m.in_channels // m.groups, m.out_channels // m.groups
        for g in range(m.groups):
            space.union_all(torch.cat([x_in[g * per_in:(g + 1) * per_in], atoms[g * per_out:(g + 1) * per_out]]))
        ctx.member(weight, 0, x_in if m.transposed else atoms, "channel")
    ctx.module_member("bias", 0, atoms, "out")
    return out
