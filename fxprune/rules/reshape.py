"""Views, reshapes and dimension permutations: elements move, each keeps its channel.

flatten (N, C, H, W) -> (N, C*H*W): feature c*H*W + j belongs to channel c, so the next Linear's
columns follow their channel. A reshape that splits channels over several dimensions (channel
shuffle's (N, C) -> (N, g, C/g)) must keep a rectangular grid after pruning: the units become the
positions along the largest such dimension, each merged across the others.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..labels import along, compress
from .registry import RuleContext, compressed, rule, run_on_labels

SPLITTING = (torch.reshape, "view", "reshape", torch.unflatten, "unflatten", "view_as", "reshape_as")
MOVES = (
    torch.flatten, "flatten", torch.permute, "permute", torch.transpose, "transpose", torch.t, "t",
    torch.squeeze, "squeeze", torch.unsqueeze, "unsqueeze", torch.movedim, "movedim", "swapaxes",
    torch.swapaxes, "expand", "expand_as", "repeat", torch.flip, "flip", torch.roll, "roll",
    F.channel_shuffle, torch.channel_shuffle, F.pixel_shuffle, F.pixel_unshuffle,
)


@rule(*MOVES)
def move(ctx: RuleContext, *args, **kwargs):  # positions move, channels follow
    return run_on_labels(ctx, args, kwargs)


@rule(nn.Flatten, nn.Unflatten, nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle)
def move_module(ctx: RuleContext, x: torch.Tensor) -> torch.Tensor:  # the module only moves elements
    out = compressed(ctx.module(x))
    return on_grid(ctx, out) if isinstance(ctx.module, nn.Unflatten) else out


@rule(*SPLITTING)
def split_dims(ctx: RuleContext, *args, **kwargs) -> torch.Tensor:  # out[idx'] <- x[idx], on a grid
    return on_grid(ctx, run_on_labels(ctx, args, kwargs))


def on_grid(ctx: RuleContext, out: torch.Tensor) -> torch.Tensor:
    """Labels that vary along one dimension only, so that pruning leaves a rectangular tensor."""
    varying = [d for d, n in enumerate(compress(out).shape) if n > 1]
    if len(varying) <= 1:
        return out
    keep = max(varying, key=lambda d: out.shape[d])
    return along(ctx.space.per_index(out, keep), keep, out.shape)
