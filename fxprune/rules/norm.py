"""Normalisation layers.

BatchNorm and InstanceNorm act on each channel alone: out[c] <- f_c(x[c]), with per-channel
parameters and statistics. LayerNorm and GroupNorm normalise across channels, so removing one of
them changes the others: such channels are not exactly prunable.
"""
from __future__ import annotations

import torch
from torch import nn

from ..labels import varies
from .registry import RuleContext, rule, same

PER_CHANNEL_STATE = ("weight", "bias", "running_mean", "running_var")


@rule(nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
def batch_norm(ctx: RuleContext, x: torch.Tensor) -> torch.Tensor:  # out[c] <- a_c * x[c] + b_c
    if not ctx.follows_producer() or not isinstance(ctx.module, nn.modules.batchnorm._BatchNorm):
        ctx.taint()  # right after its producer, masking happens after the BatchNorm
    atoms = ctx.space.per_index(x, 1)
    for attr in PER_CHANNEL_STATE:
        ctx.module_member(attr, 0, atoms, "channel")
    return same(x)


@rule(nn.LayerNorm)
def layer_norm(ctx: RuleContext, x: torch.Tensor) -> torch.Tensor:  # out[.., c] <- (x - mean_c x) / std_c x
    ctx.taint()
    dims = range(x.dim() - len(ctx.module.normalized_shape), x.dim())
    if any(varies(x, d) for d in dims):
        ctx.space.mark_inexact(x, f"{ctx.where} normalises over channels")
    if len(ctx.module.normalized_shape) == 1:
        atoms = ctx.space.per_index(x, -1)
        for attr in ("weight", "bias"):
            ctx.module_member(attr, 0, atoms, "channel")
    elif any(varies(x, d) for d in dims):
        ctx.space.block(x, f"{ctx.where} has a multi-dimensional affine shape")
    return same(x)


@rule(nn.GroupNorm)
def group_norm(ctx: RuleContext, x: torch.Tensor) -> torch.Tensor:  # out[c] <- normalised over c's group
    ctx.taint()
    if varies(x, 1):
        ctx.space.mark_inexact(x, f"{ctx.where} normalises over groups of channels")
    atoms = ctx.space.per_index(x, 1)
    for attr in ("weight", "bias"):
        ctx.module_member(attr, 0, atoms, "channel")
    return same(x)
