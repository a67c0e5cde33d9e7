"""Views, reshapes and dimension permutations: elements move, each keeps its channel.

flatten (N, C, H, W) -> (N, C*H*W): feature c*H*W + j belongs to channel c, so the next Linear's
columns follow their channel. A reshape that splits channels over several dimensions (channel
shuffle's (N, C) -> (N, g, C/g)) must keep a rectangular grid after pruning: the units become the
positions along the innermost such dimension, each merged across the others, so that the outer
sizes (g groups, h heads) stay as the code computes them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..labels import along, channels_vary, compress, varies
from .registry import RuleContext, compressed, rule, run_on_labels, same

SPLITTING = (torch.reshape, "view", "reshape", torch.unflatten, "unflatten", "view_as", "reshape_as")
MOVES = (
    torch.flatten, "flatten", torch.permute, "permute", torch.transpose, "transpose", torch.t, "t",
    torch.squeeze, "squeeze", torch.unsqueeze, "unsqueeze", torch.movedim, "movedim", "swapaxes",
    torch.swapaxes, "expand", "expand_as", "repeat", torch.flip, "flip", F.pixel_shuffle, F.pixel_unshuffle,
)


@rule(*MOVES)
def move(ctx: RuleContext, *args, **kwargs):  # positions move, channels follow
    return run_on_labels(ctx, args, kwargs)


@rule(F.channel_shuffle, torch.channel_shuffle, nn.ChannelShuffle)
def channel_shuffle(ctx: RuleContext, x: torch.Tensor, groups: int | None = None) -> torch.Tensor:
    """(N, C, ...) -> (N, g, C/g, ...) -> transpose -> (N, C, ...), on a grid like its reshapes."""
    groups = ctx.module.groups if ctx.node.op == "call_module" else groups
    n, c, *rest = x.shape
    grid = on_grid(ctx, compressed(x.reshape(n, groups, c // groups, *rest)), inner=2)
    return compressed(grid.transpose(1, 2).reshape(x.shape))


@rule(nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle)
def move_module(ctx: RuleContext, x: torch.Tensor) -> torch.Tensor:  # the module only moves elements
    out = compressed(ctx.module(x))
    return on_grid(ctx, out) if isinstance(ctx.module, nn.Unflatten) else out


@rule(*SPLITTING)
def split_dims(ctx: RuleContext, *args, **kwargs) -> torch.Tensor:  # out[idx'] <- x[idx], on a grid
    return on_grid(ctx, run_on_labels(ctx, args, kwargs))


def on_grid(ctx: RuleContext, out: torch.Tensor, inner: int | None = None) -> torch.Tensor:
    """Labels that vary along one dimension only, so that pruning leaves a rectangular tensor.

    The units run along ``inner`` where the op fixes the outer sizes (channel shuffle's group
    count), each merged across the others. Otherwise the choice waits for the whole graph
    (:meth:`LabelSpace.split`): attention over the heads of a (heads, head size) split makes each
    head one unit; else the units run along the innermost varying dimension.
    """
    varying = [d for d, n in enumerate(compress(out).shape) if n > 1]
    if inner is None and len(varying) > 1:
        ctx.space.split(out)
    if inner is None:
        return out
    if inner is not None and inner not in varying:  # every inner position holds the same units
        atom = ctx.space.union_all(out)
        return torch.full((1,) * out.dim(), atom, dtype=torch.long).expand(out.shape)
    keep = varying[-1] if inner is None else inner
    return along(ctx.space.per_index(out, keep), keep, out.shape)


@rule(torch.roll, "roll")
def roll(ctx: RuleContext, x: torch.Tensor, shifts, dims=None) -> torch.Tensor:  # out[i + k] <- x[i]
    """Rolling along channels by k is a different permutation once channels are removed; rolling
    positions that only hold padding besides the same channels (a padded window map) is not."""
    rolled = range(x.dim()) if dims is None else ([dims] if isinstance(dims, int) else dims)
    if any(channels_vary(x, d % x.dim()) for d in rolled):
        return ctx.boundary(x, f"{ctx.where} rolls channels")
    if not any(varies(x, d % x.dim()) for d in rolled):
        return same(x)  # the labels are constant along the rolled dims
    return run_on_labels(ctx, (x, shifts) if dims is None else (x, shifts, dims), {})
