"""Binary arithmetic with broadcasting: out[i] <- a[i] op b[i].

Operands that both carry channels at a position are coupled there (a residual add, or a
squeeze-excite gate scaling the channels it was computed for). An operand broadcast along a
dimension in which the other one carries channels (a single-channel attention map, a scalar)
couples nothing.
"""
from __future__ import annotations

import operator

import torch

from ..labels import NONE, compress
from .registry import RuleContext, rule

ADD = (operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub, torch.subtract,
       "add", "add_", "sub", "sub_")
MUL = (operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_")
DIV = (operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_", "true_divide")


def broadcast_only(a: torch.Tensor, b: torch.Tensor, a_shape: torch.Size, cb: torch.Tensor | None = None) -> bool:
    """Whether ``a`` (of original shape ``a_shape``) is broadcast where ``b`` carries channels
    (``cb``: ``compress(b)``, where the caller has it)."""
    cb = compress(b) if cb is None else cb
    offset = b.dim() - len(a_shape)
    return any(a_shape[d - offset] == 1 and cb.shape[d] > 1 for d in range(offset, b.dim())) or (
        offset > 0 and any(cb.shape[d] > 1 for d in range(offset))
    )


def _share_channels(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two same-shaped label tensors both vary along some dim."""
    ca, cb = compress(a), compress(b)
    return any(ca.shape[d] > 1 and cb.shape[d] > 1 for d in range(a.dim()))


@rule(*ADD, *MUL, *DIV)
def arithmetic(ctx: RuleContext, a, b, *args, **kwargs) -> torch.Tensor:  # out[i] <- a[i] op b[i]
    additive = ctx.node.target not in DIV + MUL
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        if ctx.node.target in DIV and isinstance(b, torch.Tensor):
            ctx.space.block(b, f"divides by channel values at {ctx.where}")
        if additive:
            ctx.taint()  # x + 1
        labels = a if isinstance(a, torch.Tensor) else b
        return labels.expand(ctx.out_shape())
    shape = ctx.out_shape()
    wa, wb = a.expand(shape), b.expand(shape)
    if ctx.node.target in DIV:
        ctx.space.block(b, f"divides by channel values at {ctx.where}")
    ca, cb = compress(wa), compress(wb)
    a_alone, b_alone = broadcast_only(a, wb, a.shape, cb), broadcast_only(b, wa, b.shape, ca)
    if (a_alone or b_alone) and _share_channels(wa, wb):
        a_alone = b_alone = False  # a per-head scale over (heads, head dim) entries: coupled along the heads
    if a_alone and b_alone:
        reason = f"broadcasts against channels of another tensor at {ctx.where}"
        ctx.space.block(a, reason)
        ctx.space.block(b, reason)
    if (a_alone or b_alone) and additive:
        ctx.taint()  # x + y[broadcast]: a masked channel of x becomes y
    if a_alone:
        return wb
    if b_alone:
        return wa
    ctx.space.union(wa, wb)
    return torch.where(ca != NONE, ca, cb).expand(shape)
