"""ConvNd and ConvTransposeNd, grouped and depthwise.

out[o] <- sum over the input channels of o's group. With groups == 1 the output channels are new
and input channel i owns the weight slice of i. A grouped conv (g groups of ``ci`` input and ``co``
output channels) must keep its groups equal, in one of two ways:

- per-group channels: unit i of the input is channel i of every group (i < ci), unit o of the
  output channel o of every group; the conv keeps its g groups, each narrower. Input and output
  units are independent (ResNeXt and RegNet width pruning).
- whole groups: unit k is group k, its input and output channels together; the conv loses groups
  and keeps their width (a depthwise conv loses channels).

The rule takes the one with more units: whole groups where there are at least as many groups as
channels per group (every depthwise conv), else per-group channels.
"""
from __future__ import annotations

import torch
from torch import nn

from .registry import RuleContext, rule


def whole_groups(m: nn.modules.conv._ConvNd) -> bool:
    """Whether the units of grouped conv ``m`` are whole groups (else: channel positions in a group)."""
    return m.groups >= max(m.in_channels, m.out_channels) // m.groups


@rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv(ctx: RuleContext, x: torch.Tensor, *args) -> torch.Tensor:  # out[o] <- W[o, :] * x
    m, space = ctx.module, ctx.space
    weight = ctx.param_name("weight")
    x_in = space.per_index(x, 1)
    out = ctx.produce(weight, m.out_channels, 1)
    atoms = space.owned(weight, "out", m.out_channels)
    in_dim, out_dim = (0, 1) if m.transposed else (1, 0)
    per_in, per_out = m.in_channels // m.groups, m.out_channels // m.groups
    if m.groups == 1:
        ctx.member(weight, in_dim, x_in, "in", input_dim=1)
        ctx.member(weight, out_dim, atoms, "out")
    elif whole_groups(m):  # unit k: input and output channels of group k
        _union_rows(ctx, torch.cat([x_in.reshape(m.groups, per_in), atoms.reshape(m.groups, per_out)], 1))
        ctx.member(weight, 0, x_in if m.transposed else atoms, "channel")
    else:  # input unit i: channel i of every group; output unit o likewise
        _union_rows(ctx, x_in.reshape(m.groups, per_in).t())
        space.union_rows(atoms.reshape(m.groups, per_out).t())
        if m.transposed:  # weight (in, out / groups)
            ctx.member(weight, 0, x_in, "in", input_dim=1)
            ctx.member(weight, 1, atoms[:per_out], "out")
        else:  # weight (out, in / groups): column i reads channel i of every group
            ctx.member(weight, 0, atoms, "out")
            ctx.member(weight, 1, x_in[:per_in], "in", input_dim=1, input_groups=m.groups)
    ctx.module_member("bias", 0, atoms, "out")
    return out


def _union_rows(ctx: RuleContext, rows: torch.Tensor) -> None:
    """Merge the channels of each row, which go together; where some of a row are no channel
    (constant padding), the others cannot go without them."""
    partial = (rows < 0).any(1)
    if bool(partial.any()):
        ctx.space.block(rows[partial], f"{ctx.where} reads, in one group position, channels and entries that are none")
    ctx.space.union_rows(rows)
