"""Reductions and softmax.

Reducing over dimensions where channels do not vary (global pooling by x.mean((2, 3))) keeps each
channel alone. Reducing or normalising across channels (mean, sum or softmax over the channel
dimension) mixes them: their removal would change the result, so they are not exactly prunable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..labels import compress, varies
from .registry import RuleContext, rule

REDUCTIONS = (
    torch.mean, torch.sum, torch.amax, torch.amin, torch.prod, torch.std, torch.var, torch.logsumexp,
    torch.norm, torch.max, torch.min, torch.all, torch.any,
    "mean", "sum", "amax", "amin", "prod", "std", "var", "logsumexp", "norm", "max", "min", "all", "any",
)
SOFTMAX = (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax",
           nn.Softmax, nn.LogSoftmax, nn.Softmax2d)


def reduced_dims(ctx: RuleContext, x: torch.Tensor, args: tuple, kwargs: dict) -> list[int]:
    dim = kwargs.get("dim", args[0] if args else None)
    if ctx.node.target in (torch.norm, "norm"):
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is None:
        return list(range(x.dim()))
    dims = dim if isinstance(dim, (tuple, list)) else [dim]
    return sorted(d % x.dim() for d in dims)


@rule(*REDUCTIONS)
def reduce(ctx: RuleContext, x: torch.Tensor, *args, **kwargs):  # out[c] <- r(x[c, ...]) over the dims
    dims = reduced_dims(ctx, x, args, kwargs)
    if ctx.node.target in (torch.logsumexp, "logsumexp"):
        ctx.taint()  # logsumexp(0, ..., 0) = log(n)
    if any(varies(x, d) for d in dims):
        ctx.space.mark_inexact(x, f"{ctx.where} reduces across channels")
    keep = [d for d in range(x.dim()) if d not in dims]
    small = compress(x).permute(*keep, *dims)
    rest = small.shape[:len(keep)]
    merged = torch.tensor([ctx.space.union_all(row) for row in small.reshape(rest.numel(), -1)]).reshape(rest)
    meta = ctx.node.meta["tensor_meta"]
    if not hasattr(meta, "shape"):  # max/min with a dim return (values, indices)
        kind = getattr(torch.return_types, getattr(ctx.node.target, "__name__", ctx.node.target))
        return kind([_shaped(merged, keep, dims, m.shape) for m in meta])
    return _shaped(merged, keep, dims, meta.shape)


def _shaped(merged: torch.Tensor, keep: list[int], dims: list[int], shape: torch.Size) -> torch.Tensor:
    if len(shape) == len(keep) + len(dims):  # keepdim
        view = [merged.shape[keep.index(d)] if d in keep else 1 for d in range(len(shape))]
        return merged.reshape(view).expand(shape)
    return merged.expand(shape)


@rule(*SOFTMAX)
def softmax(ctx: RuleContext, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # out[c] <- e^x[c] / sum e^x
    ctx.taint()
    if ctx.node.op == "call_module":
        dim = ctx.module.dim if not isinstance(ctx.module, nn.Softmax2d) else -3
    else:
        dim = kwargs.get("dim", args[0] if args else None)
    if dim is None or varies(x, dim % x.dim()):
        ctx.space.mark_inexact(x, f"{ctx.where} normalises across channels")
    return x
