"""Pooling and resampling over spatial dimensions: out[c] <- g(x[c]) for each channel c alone."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..labels import along
from .registry import RuleContext, rule

MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool1d, nn.LPPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)
FUNCTIONS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.lp_pool1d, F.lp_pool2d, F.interpolate, F.upsample,
)


@rule(*MODULES, *FUNCTIONS)
def spatial(ctx: RuleContext, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # out[c] <- pool(x[c])
    return along(ctx.space.per_index(x, 1), 1, ctx.out_shape())
