"""Queries of shape and type: they read label tensors, whose shapes equal the real ones."""
from __future__ import annotations

import builtins

from torch.nn.modules import transformer

from .registry import RuleContext, rule


@rule(builtins.getattr, "size", "dim", "numel", "ndimension", "nelement")
def query(ctx: RuleContext, x, *args):  # a Python value, not a tensor: no channels
    if ctx.node.op == "call_method":
        return getattr(x, ctx.node.target)(*args)
    return getattr(x, *args)


@rule(transformer._get_seq_len)
def sequence_length(ctx: RuleContext, x, batch_first: bool):  # a transformer's sequence length
    return transformer._get_seq_len(x, batch_first)
