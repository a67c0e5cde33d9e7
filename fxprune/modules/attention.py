"""Multi-head attention whose heads times head size need not equal the embedding size."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.fx.wrap
def _additive_mask(mask: Tensor, name: str, dtype: torch.dtype, other: Tensor | None = None) -> Tensor:
    """Turn a bool mask into a float one (-inf where True) exactly as nn.MultiheadAttention does.

    Wrapped for torch.fx because F._canonical_mask branches on the mask's dtype.
    """
    return F._canonical_mask(
        mask=mask,
        mask_name=name,
        other_type=F._none_or_dtype(other),
        other_name="attn_mask",
        target_type=dtype,
    )


def _pad_key(mask: Tensor | None) -> Tensor | None:
    """Let the mask admit one more (bias or zero) key at the end."""
    return None if mask is None else F.pad(mask, (0, 1))


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention with the semantics of nn.MultiheadAttention, where the number of heads
    times the head size need not equal embed_dim (what remains after heads are removed).

    ``packed`` chooses one ``in_proj_weight`` for q, k and v (default: when key and value have
    ``embed_dim`` features, as nn.MultiheadAttention does); ``out_features`` is the output width
    (default ``embed_dim``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        dropout: float = 0.0,
        batch_first: bool = False,
        packed: bool | None = None,
        out_features: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        if embed_dim <= 0 or num_heads <= 0 or head_dim <= 0:
            raise ValueError(
                f"embed_dim, num_heads and head_dim must be greater than 0, "
                f"got {embed_dim}, {num_heads} and {head_dim}"
            )
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        same = self.kdim == embed_dim and self.vdim == embed_dim
        self._qkv_same_embed_dim = same if packed is None else packed  # one in_proj_weight for q, k, v
        self.out_features = out_features or embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        inner = num_heads * head_dim

        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(inner, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(inner, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(inner, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * inner, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(inner, self.out_features, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, inner, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, inner, **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Initialise as nn.MultiheadAttention does."""
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Same arguments, shapes and results as nn.MultiheadAttention.forward."""
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        if key_padding_mask is not None:
            key_padding_mask = _additive_mask(key_padding_mask, "key_padding_mask", query.dtype, attn_mask)
        if attn_mask is not None:
            attn_mask = _additive_mask(attn_mask, "attn_mask", query.dtype)
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # as in torch, the hint alone makes SDPA causal
        elif key_padding_mask is not None:
            is_causal = False  # merged with the padding mask, the mask is no longer causal

        # An unbatched input is run as a batch of one (batch_first is then ignored, as in torch);
        # reshapes rather than branches on query.dim() keep this traceable by torch.fx.
        shape = query.shape
        if self.batch_first:
            batch_shape = shape[:-2]
            query, key, value = (x.reshape(-1, x.shape[-2], x.shape[-1]).transpose(0, 1) for x in (query, key, value))
        else:
            batch_shape = shape[1:-1]
            query, key, value = (x.reshape(x.shape[0], -1, x.shape[-1]) for x in (query, key, value))
        tgt_len, bsz = query.shape[0], query.shape[1]
        heads, head_dim = self.num_heads, self.head_dim

        q, k, v = self._in_projection(query, key, value)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(1, bsz, -1)])
            v = torch.cat([v, self.bias_v.expand(1, bsz, -1)])
            attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
        # (batch * heads, length, head_dim)
        q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.reshape(-1, bsz * heads, head_dim).transpose(0, 1)
        v = v.reshape(-1, bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))
            attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
        src_len = k.shape[1]

        if key_padding_mask is not None:
            key_padding_mask = (
                key_padding_mask.reshape(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len)
            )
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        # attn_mask now broadcasts to (batch * heads, tgt_len, src_len)
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            q = q * math.sqrt(1.0 / head_dim)
            if attn_mask is None:
                weights = torch.bmm(q, k.transpose(-2, -1))
            else:
                weights = torch.baddbmm(attn_mask, q, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, heads * head_dim)
            weights = weights.reshape(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            weights = weights.reshape(batch_shape + weights.shape[1:])
        else:
            if attn_mask is not None:
                attn_mask = attn_mask.expand(bsz * heads, -1, -1).reshape(bsz, heads, -1, src_len)
            out = F.scaled_dot_product_attention(
                q.reshape(bsz, heads, tgt_len, head_dim),
                k.reshape(bsz, heads, src_len, head_dim),
                v.reshape(bsz, heads, src_len, head_dim),
                attn_mask,
                dropout_p,
                is_causal,
            )
            out = out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, heads * head_dim)

        out = self.out_proj(out).reshape(tgt_len, bsz, self.out_features)
        if self.batch_first:
            out = out.transpose(0, 1)
        return out.reshape(shape[:-1] + (self.out_features,)), weights
