"""Element-wise unary ops, dropout, identity and dtype casts: out[i] <- f(x[i]).

A channel keeps its place. A masked channel's value becomes f(0): ops with f(0) != 0 say so, and
the compaction then folds or keeps that value (see :mod:`fxprune.passes.fold_constants`).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from .registry import RuleContext, rule, same

MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.LogSigmoid, nn.Tanhshrink, nn.Threshold, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    F.sigmoid, F.tanh, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.softsign, F.logsigmoid,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.sqrt, torch.square,
    torch.clamp, torch.clip, torch.nn.functional.hardshrink,
    torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like,  # shaped like x, values constant
    operator.neg, operator.pos, operator.abs,
    "torchvision.ops.stochastic_depth.stochastic_depth",  # x * bernoulli(N, 1, ...) / (1 - p)
)
METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "sqrt", "square",
    "clamp", "clamp_", "clip", "contiguous", "clone", "detach", "float", "half", "double", "bfloat16",
    "to", "type", "type_as", "requires_grad_",
)


NONZERO_AT_ZERO = (
    nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid, nn.Threshold,
    F.sigmoid, F.hardsigmoid, F.softplus, F.logsigmoid, F.hardtanh, torch.sigmoid, torch.exp, torch.ones_like,
    torch.full_like,
    torch.clamp, torch.clip, "sigmoid", "sigmoid_", "exp", "clamp", "clamp_", "clip",
)


def nonzero_at_zero(ctx: RuleContext) -> bool:
    if ctx.node.op != "call_module":
        return ctx.node.target in NONZERO_AT_ZERO
    m = ctx.module
    return isinstance(m, NONZERO_AT_ZERO[:5]) or (isinstance(m, nn.Hardtanh) and m.min_val > 0)


@rule(*MODULES, *FUNCTIONS, *METHODS)
def elementwise(ctx: RuleContext, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # out[i] <- f(x[i])
    if nonzero_at_zero(ctx):
        ctx.taint()
    if ctx.node.op == "call_module" and isinstance(ctx.module, nn.PReLU) and ctx.module.num_parameters > 1:
        ctx.module_member("weight", 0, ctx.space.per_index(x, 1), "channel")
    return same(x)
