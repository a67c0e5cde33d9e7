"""Normalisation layers.

BatchNorm and InstanceNorm act on each channel alone: out[c] <- f_c(x[c]), with per-channel
parameters and statistics. LayerNorm and GroupNorm normalise across channels, so removing one of
them changes the others: such channels are not exactly prunable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
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


@rule(F.batch_norm, F.instance_norm)
def batch_norm_function(ctx: RuleContext, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """F.batch_norm(x, running_mean, running_var, weight, bias): per-channel tensors join x's channels."""
    ctx.taint()
    atoms = ctx.space.per_index(x, 1)
    for t in [*args, *kwargs.values()]:
        if isinstance(t, torch.Tensor) and t.dim() == 1 and len(t) == len(atoms):
            ctx.space.union(t, atoms)
    return same(x)


@rule(F.normalize)
def normalize(ctx: RuleContext, x: torch.Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out=None) -> torch.Tensor:
    """out[.., c] <- x[.., c] / max(||x||_p, eps) over ``dim``: exact while each unit lies along ``dim``
    whole (the head dim of a head), decided once the units are known."""
    ctx.space.mixes_along(x, (dim,), f"{ctx.where} normalises over channels")
    return same(x)


@rule(F.layer_norm, F.group_norm)
def norm_function(ctx: RuleContext, x: torch.Tensor, shape_or_groups, *args, **kwargs) -> torch.Tensor:
    """F.layer_norm / F.group_norm: normalise across channels; affine tensors join x's channels."""
    ctx.taint()
    dim = -1 if ctx.node.target is F.layer_norm else 1
    if varies(x, dim % x.dim()):
        ctx.space.mark_inexact(x, f"{ctx.where} normalises over channels")
    atoms = ctx.space.per_index(x, dim)
    for t in [*args, *kwargs.values()]:
        if isinstance(t, torch.Tensor) and t.dim() == 1 and len(t) == len(atoms):
            ctx.space.union(t, atoms)
    return same(x)
