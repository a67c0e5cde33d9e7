"""Shifted window attention (Swin) that torch.fx traces through, for torchvision's Swin Transformers.

torchvision's ``shifted_window_attention`` is one opaque call that computes its head size as input
width // num_heads, so neither its heads nor its input features could be removed. While tracing,
fxprune records this function in its place: the same arguments and results, but the head size
follows from the q/k/v projection and the output width from the output projection, and every
size that counts channels is a literal (``num_heads``) or read from a tensor. Its ops get their
own channel rules, so heads and features become groups, and compaction rewrites the head count.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor


@torch.fx.wrap
def shifted_window_mask(pad_h: int, pad_w: int, window_size: list[int], shift: tuple[int, int]) -> Tensor:
    """The additive mask (num_windows, N, N) that keeps shifted windows from attending across the
    map's wrap-around: -100 between tokens of different regions, else 0 (all 0 without a shift)."""
    return _window_mask(int(pad_h), int(pad_w), tuple(window_size), (int(shift[0]), int(shift[1]))).clone()


@functools.lru_cache(maxsize=64)
def _window_mask(pad_h: int, pad_w: int, window_size: tuple[int, int], shift: tuple[int, int]) -> Tensor:
    mask = torch.zeros((pad_h, pad_w))
    if shift[0] or shift[1]:
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift[0]), (-shift[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift[1]), (-shift[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                mask[h[0]:h[1], w[0]:w[1]] = count
                count += 1
    mask = mask.view(pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1])
    mask = mask.permute(0, 2, 1, 3).reshape(-1, window_size[0] * window_size[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))


def shifted_window_attention(
    input: Tensor,
    qkv_weight: Tensor,
    proj_weight: Tensor,
    relative_position_bias: Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: Tensor | None = None,
    proj_bias: Tensor | None = None,
    logit_scale: Tensor | None = None,
    training: bool = True,
) -> Tensor:
    """torchvision.models.swin_transformer.shifted_window_attention, traceable, with the head size
    taken from ``qkv_weight`` (3 * num_heads * head size rows): see torchvision for the arguments."""
    B, H, W, _ = input.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    # no shift where one window covers the map; arithmetic rather than a branch, so that it traces
    shift = (shift_size[0] * (window_size[0] < pad_H), shift_size[1] * (window_size[1] < pad_W))
    x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))

    # partition windows: (B * num_windows, tokens, C)
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], -1)

    if logit_scale is not None and qkv_bias is not None:  # Swin V2 has no key bias
        q_bias, k_bias, v_bias = qkv_bias.chunk(3)
        qkv_bias = torch.cat((q_bias, torch.zeros_like(k_bias), v_bias))
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        q = q * q.size(-1) ** -0.5
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias

    mask = shifted_window_mask(pad_H, pad_W, window_size, shift).to(attn)
    attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
    attn = attn + mask.unsqueeze(1).unsqueeze(0)
    attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)

    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), -1)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)

    # reverse windows, reverse the shift, unpad
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, -1)
    x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()
