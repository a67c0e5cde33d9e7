"""Helpers of windowed vision transformers (torchvision's Swin), recorded as single calls.

relative position bias:  out[0, h, i, j] <- table[index[i, j], h]: head h is column h of the table.
patch merging:           out[.., k * C + c] <- x[.., c] of the k-th of four neighbouring tokens.
"""
from __future__ import annotations

import torch

from ..labels import along
from .registry import RuleContext, rule


@rule("torchvision.models.swin_transformer._get_relative_position_bias")
def relative_position_bias(ctx: RuleContext, table: torch.Tensor, index, window_size) -> torch.Tensor:
    return along(ctx.space.per_index(table, 1), 1, ctx.out_shape())


@rule("torchvision.models.swin_transformer._patch_merging_pad")
def patch_merging(ctx: RuleContext, x: torch.Tensor) -> torch.Tensor:
    return along(ctx.space.per_index(x, -1).repeat(4), -1, ctx.out_shape())
