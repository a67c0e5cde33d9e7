"""Make module attributes agree with their resized parameters: one small handler per module class."""
from __future__ import annotations

from collections.abc import Callable

import torch.fx
from torch import nn

RESIZERS: dict[type, Callable[[nn.Module, nn.Module], None]] = {}


def resizer(*classes: type):
    """Register how a module class recomputes its attributes (``old`` is the module before)."""

    def register(fn):
        for cls in classes:
            RESIZERS[cls] = fn
        return fn

    return register


@resizer(nn.modules.conv._ConvNd)
def _conv(m, old) -> None:  # grouped convs lose whole groups; channels per group stay
    outer, inner = m.weight.shape[:2]  # (out, in/groups) or, transposed, (in, out/groups)
    per_group = (old.in_channels if m.transposed else old.out_channels) // old.groups
    m.groups = outer // per_group if old.groups > 1 else 1
    if m.transposed:
        m.in_channels, m.out_channels = outer, inner * m.groups
    else:
        m.out_channels, m.in_channels = outer, inner * m.groups


@resizer(nn.Linear)
def _linear(m, old) -> None:
    m.out_features, m.in_features = m.weight.shape


@resizer(nn.modules.batchnorm._NormBase)
def _norm(m, old) -> None:
    tensor = m.weight if m.weight is not None else m.running_mean
    if tensor is not None:
        m.num_features = tensor.shape[0]


@resizer(nn.LayerNorm)
def _layer_norm(m, old) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


@resizer(nn.GroupNorm)
def _group_norm(m, old) -> None:
    if m.weight is not None:
        m.num_channels = m.weight.shape[0]


@resizer(nn.Embedding)
def _embedding(m, old) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


@resizer(nn.PReLU)
def _prelu(m, old) -> None:
    m.num_parameters = m.weight.numel()


def resize_modules(gm: torch.fx.GraphModule, before: torch.fx.GraphModule) -> None:
    """Update the attributes of every resizable module of ``gm``, in place."""
    for name, m in gm.named_modules():
        for cls in type(m).__mro__:
            if cls in RESIZERS:
                RESIZERS[cls](m, before.get_submodule(name))
                break
