"""Make module attributes agree with their resized parameters: one small handler per module class."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx
from torch import nn

from .rewrite_shapes import Shapes

RESIZERS: dict[type, Callable[[nn.Module, nn.Module, list[int]], None]] = {}


def resizer(*classes: type):
    """Register how a module class recomputes its attributes.

    A resizer gets the module, the module before compaction, and the new shape of its input.
    """

    def register(fn):
        for cls in classes:
            RESIZERS[cls] = fn
        return fn

    return register


@resizer(nn.modules.conv._ConvNd)
def _conv(m, old, in_shape) -> None:  # grouped convs lose whole groups; channels per group stay
    outer, inner = m.weight.shape[:2]  # (out, in/groups) or, transposed, (in, out/groups)
    per_group = (old.in_channels if m.transposed else old.out_channels) // old.groups
    m.groups = outer // per_group if old.groups > 1 else 1
    if m.transposed:
        m.in_channels, m.out_channels = outer, inner * m.groups
    else:
        m.out_channels, m.in_channels = outer, inner * m.groups


@resizer(nn.Linear)
def _linear(m, old, in_shape) -> None:
    m.out_features, m.in_features = m.weight.shape


@resizer(nn.modules.batchnorm._NormBase)
def _norm(m, old, in_shape) -> None:
    m.num_features = in_shape[1]


@resizer(nn.LayerNorm)
def _layer_norm(m, old, in_shape) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


@resizer(nn.GroupNorm)
def _group_norm(m, old, in_shape) -> None:
    if m.weight is not None:
        m.num_channels = m.weight.shape[0]


@resizer(nn.Embedding)
def _embedding(m, old, in_shape) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


@resizer(nn.PReLU)
def _prelu(m, old, in_shape) -> None:
    m.num_parameters = m.weight.numel()


def resize_modules(gm: torch.fx.GraphModule, before: torch.fx.GraphModule, shapes: Shapes) -> None:
    """Update the attributes of every called, resizable module of ``gm``, in place."""
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        m = gm.get_submodule(node.target)
        for cls in type(m).__mro__:
            if cls in RESIZERS:
                x = node.args[0]
                in_shape = shapes.new_shape(x) if isinstance(shapes.labels(x), torch.Tensor) else None
                RESIZERS[cls](m, before.get_submodule(node.target), in_shape)
                break
