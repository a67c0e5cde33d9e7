"""Embedding: out[..., d] <- W[index, d]; the embedding dimension is a new channel space."""
from __future__ import annotations

import torch
from torch import nn

from .registry import RuleContext, rule


@rule(nn.Embedding)
def embedding(ctx: RuleContext, indices: torch.Tensor) -> torch.Tensor:  # out[.., d] <- W[i, d]
    weight = ctx.param_name("weight")
    out = ctx.produce(weight, ctx.module.embedding_dim, -1)
    ctx.member(weight, 1, ctx.space.owned(weight, "out", ctx.module.embedding_dim), "out")
    return out
