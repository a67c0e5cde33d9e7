"""Multi-head attention: nn.MultiheadAttention (and the compacted PrunedMultiheadAttention), and
F.scaled_dot_product_attention.

out <- out_proj(concat over heads of softmax(q_h k_h^T / sqrt(d)) v_h), with q, k, v the rows of
each head in the input projections. A unit is a whole head: its q, k and v rows (and biases) and
its columns of ``out_proj``, so every head keeps ``head_dim`` and the scaling stays exact. The
heads form a group named ``<module>.heads``. The input projections' columns read the query, key
and value features; ``out_proj`` produces the output features, which join the residual stream.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..labels import along, no_channels, varies
from ..modules.attention import PrunedMultiheadAttention
from .arithmetic import broadcast_only
from .contraction import contract
from .registry import RuleContext, element_read, rule

PROJECTIONS = (("q_proj_weight", 0, "query"), ("k_proj_weight", 1, "key"), ("v_proj_weight", 2, "value"))


@rule(nn.MultiheadAttention, PrunedMultiheadAttention)
def multihead_attention(ctx: RuleContext, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                        average_attn_weights: bool = True, is_causal: bool = False) -> tuple:
    m, space, target = ctx.module, ctx.space, ctx.node.target
    packed = m.in_proj_weight is not None
    owner = ctx.param_name("in_proj_weight" if packed else "q_proj_weight")
    heads = ctx.channels(owner, m.num_heads, f"{target}.heads", key="heads")
    rows = heads.repeat_interleave(m.head_dim)
    if packed:
        ctx.member(owner, 0, rows.repeat(3), "out")
    for (name, position, keyword), x in zip(PROJECTIONS, (query, key, value)):
        weight = owner if packed else ctx.param_name(name)  # one packed weight reads all three inputs
        if not packed:
            ctx.member(weight, 0, rows, "out")
        arg = ctx.argument(position, keyword)
        ctx.member(weight, 1, space.per_index(x, -1), "in", input_dim=-1, input_arg=arg)
    ctx.module_member("in_proj_bias", 0, rows.repeat(3), "out")
    for name in ("bias_k", "bias_v"):
        ctx.module_member(name, 2, rows, "out")
    out_weight = ctx.param_name("out_proj.weight")
    ctx.member(out_weight, 1, rows, "read")
    features = ctx.channels(out_weight, m.out_proj.out_features, target)
    ctx.member(out_weight, 0, features, "out")
    if m.out_proj.bias is not None:
        ctx.member(ctx.param_name("out_proj.bias"), 0, features, "out")
    out_meta, weights_meta = ctx.node.meta["tensor_meta"]
    output = along(features, -1, out_meta.shape)
    if weights_meta is None:
        return output, None
    if average_attn_weights:
        if element_read(ctx.node, 1):
            space.block(heads, f"{ctx.where} returns attention weights averaged over its heads, and they are used")
        return output, no_channels(weights_meta.shape)
    return output, along(heads, -3, weights_meta.shape)


@rule(F.scaled_dot_product_attention)
def scaled_dot_product_attention(ctx: RuleContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask=None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale=None, enable_gqa: bool = False):
    """softmax(q k^T * scale + mask) v over the batch dims (heads): q and k meet over their last dim,
    the scores and v over the keys. The default scale is 1/sqrt(q's last size): exact while each unit
    spans that dim whole (a head), decided once the units are known."""
    if enable_gqa:
        return ctx.boundary((q, k, v, attn_mask), f"{ctx.where} shares key and value heads between query heads")
    args = [ctx.node.args[i] if len(ctx.node.args) > i else ctx.node.kwargs.get(name)
            for i, name in enumerate(("query", "key", "value"))]
    batch = "abcdefgh"[:q.dim() - 2]
    shape = torch.Size((*torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]), q.shape[-2], k.shape[-2]))
    scores = contract(ctx, [(q, batch + "le", args[0]), (k, batch + "se", args[1])], batch + "ls", shape)
    if isinstance(attn_mask, torch.Tensor) and not broadcast_only(attn_mask, scores, attn_mask.shape):
        ctx.space.union(attn_mask.expand(shape), scores)  # a per-head bias joins its head
    if varies(scores, -1):
        ctx.space.mark_inexact(scores, f"{ctx.where} normalises across channels")
    if scale is None:
        ctx.space.mixes_along(q, (-1,), f"{ctx.where} scales by the head size")
    return contract(ctx, [(scores, batch + "ls", None), (v, batch + "sd", args[2])], batch + "ld")

