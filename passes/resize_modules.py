"""Make module attributes agree with their resized parameters: one small handler per module class."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx
from torch import nn

from fxprune.errors import CompactError
from fxprune.modules.attention import PrunedMultiheadAttention
from fxprune.modules.recurrent import RecurrentStack, directions_of, parameters_of, widths
from fxprune.rules.conv import whole_groups
from fxprune.rules.recurrent import states_used

from .rewrite_shapes import Shapes

RESIZERS: dict[type, Callable[[nn.Module, nn.Module, list[int], torch.fx.Node], nn.Module | None]] = {}


def resizer(*classes: type):
    """Register how a module class recomputes its attributes.

    A resizer gets the module, the module before compaction, the new shape of its input and its
    node. It updates the module in place, or returns a module to replace it where the module's class
    cannot hold the new shapes.
    """

    def register(fn):
        for cls in classes:
            RESIZERS[cls] = fn
        return fn

    return register


@resizer(nn.modules.conv._ConvNd)
def _conv(m, old, in_shape, node) -> None:  # a grouped conv loses whole groups, or channels in every group
    outer, inner = m.weight.shape[:2]  # (out, in/groups) or, transposed, (in, out/groups)
    per_group = (old.in_channels if m.transposed else old.out_channels) // old.groups
    m.groups = outer // per_group if old.groups > 1 and whole_groups(old) else old.groups
    if m.transposed:
        m.in_channels, m.out_channels = outer, inner * m.groups
    else:
        m.out_channels, m.in_channels = outer, inner * m.groups


@resizer(nn.Linear)
def _linear(m, old, in_shape, node) -> None:
    m.out_features, m.in_features = m.weight.shape


@resizer(nn.modules.batchnorm._NormBase)
def _norm(m, old, in_shape, node) -> None:
    m.num_features = in_shape[1]


@resizer(nn.LayerNorm)
def _layer_norm(m, old, in_shape, node) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


@resizer(nn.GroupNorm)
def _group_norm(m, old, in_shape, node) -> None:
    if m.weight is not None:
        m.num_channels = m.weight.shape[0]


@resizer(nn.Embedding)
def _embedding(m, old, in_shape, node) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


@resizer(nn.PReLU)
def _prelu(m, old, in_shape, node) -> None:
    m.num_parameters = m.weight.numel()


@resizer(nn.RNNBase, RecurrentStack)
def _recurrent(m, old, in_shape, node) -> nn.Module | None:
    """One module while every layer and direction keeps the same width; else one per layer."""
    layers = [[parameters_of(d) for d in directions] for directions in directions_of(m)]
    like = m if isinstance(m, nn.RNNBase) else directions_of(m)[0][0][1]
    found = {widths(like, p) for layer in layers for p in layer}
    too_narrow = any(0 < proj >= hidden for hidden, proj in found)  # nn.LSTM needs proj_size < hidden_size
    if too_narrow and (len(node.args) > 1 or "hx" in node.kwargs or states_used(node)):
        raise CompactError(
            f"the masks keep {found} (hidden, projected) units in LSTM '{node.target}', whose cell state is "
            "used or passed in: nn.LSTM needs more hidden units than projected ones; keep more hidden units")
    if isinstance(m, RecurrentStack) or len(found) > 1 or too_narrow:
        return RecurrentStack.from_parameters(like, layers, m.dropout, m.batch_first).train(m.training)
    m.hidden_size, m.proj_size = widths(like, layers[0][0])
    m.input_size = m.weight_ih_l0.shape[1]
    m._init_flat_weights()
    return None


@resizer(nn.RNNCellBase)
def _recurrent_cell(m, old, in_shape, node) -> None:
    m.input_size, m.hidden_size = m.weight_ih.shape[1], m.weight_hh.shape[1]


@resizer(nn.MultiheadAttention, PrunedMultiheadAttention)
def _attention(m, old, in_shape, node) -> nn.Module | None:
    """nn.MultiheadAttention needs num_heads * head_dim == embed_dim: once heads or features are
    removed it becomes a PrunedMultiheadAttention holding the same parameters."""
    packed = m.in_proj_weight is not None
    q = m.in_proj_weight if packed else m.q_proj_weight
    heads = q.shape[0] // (3 if packed else 1) // m.head_dim
    kdim, vdim = (q.shape[1],) * 2 if packed else (m.k_proj_weight.shape[1], m.v_proj_weight.shape[1])
    m.out_proj.out_features, m.out_proj.in_features = m.out_proj.weight.shape
    if isinstance(m, PrunedMultiheadAttention):
        m.num_heads, m.embed_dim, m.kdim, m.vdim = heads, q.shape[1], kdim, vdim
        m.out_features = m.out_proj.out_features
        return None
    if (heads, q.shape[1], kdim, vdim, m.out_proj.out_features) == (old.num_heads, old.embed_dim, old.kdim, old.vdim, old.embed_dim):
        return None
    new = PrunedMultiheadAttention(
        q.shape[1], heads, m.head_dim, kdim=kdim, vdim=vdim, bias=m.in_proj_bias is not None,
        add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn, dropout=m.dropout,
        batch_first=m.batch_first, packed=packed, out_features=m.out_proj.out_features,
        device=q.device, dtype=q.dtype,
    )
    new.load_state_dict(m.state_dict(), assign=True)
    return new.train(m.training)


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
                replacement = RESIZERS[cls](m, before.get_submodule(node.target), in_shape, node)
                if replacement is not None:
                    gm.set_submodule(node.target, replacement)
                break
