"""Padding. Constant padding adds elements that belong to no channel; padding with copies of the
border (reflect, replicate, circular) stays within each channel."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..labels import NONE, along
from .registry import RuleContext, rule


def pad_labels(ctx: RuleContext, x: torch.Tensor, pad: tuple[int, ...], mode: str, value=None) -> torch.Tensor:
    touches_channels = len(pad) // 2 > x.dim() - 2
    if mode == "constant" and value:
        ctx.taint()  # a masked channel gets a border of `value`
    if mode == "constant":
        return F.pad(x, pad, value=NONE)
    if touches_channels:
        return ctx.boundary(x, f"{ctx.where} pads the channel dimension with mode '{mode}'")
    return along(ctx.space.per_index(x, 1), 1, ctx.out_shape())


@rule(F.pad)
def pad(ctx: RuleContext, x: torch.Tensor, pad: tuple[int, ...], mode: str = "constant", value=None):
    return pad_labels(ctx, x, pad, mode, value)  # out[.., i + p] <- x[.., i]; new elements belong to no channel


@rule(nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
      nn.modules.padding._ReplicationPadNd, nn.modules.padding._CircularPadNd)
def pad_module(ctx: RuleContext, x: torch.Tensor) -> torch.Tensor:
    m = ctx.module
    mode = {"Constant": "constant", "Zero": "constant", "Reflection": "reflect",
            "Replication": "replicate", "Circular": "circular"}
    kind = next(v for k, v in mode.items() if type(m).__name__.startswith(k))
    return pad_labels(ctx, x, tuple(m.padding), kind, getattr(m, "value", None))
