"""Embedding: out[..., d] <- W[index, d]; the embedding dimension is a new channel space.

A decoder that shares the embedding's weight (weight tying) reads the same columns as its input
features, so the embedding dimension couples with the decoder's input.
"""
from __future__ import annotations

import torch
from torch import nn

from .registry import RuleContext, rule


@rule(nn.Embedding)
def embedding(ctx: RuleContext, indices: torch.Tensor) -> torch.Tensor:  # out[.., d] <- W[i, d]
    weight = ctx.param_name("weight")
    out = ctx.produce(weight, ctx.module.embedding_dim, -1, key="columns")  # a tied decoder owns the rows
    ctx.member(weight, 1, ctx.space.owned(weight, "columns", ctx.module.embedding_dim), "out")
    return out
