"""Fold BatchNorm into the layer before it and drop dropout: a rewrite for inference only.

A BatchNorm in eval mode is an affine map per channel, so where it directly follows a convolution
or a Linear layer whose output nothing else reads, ``fuse_conv_bn_eval``/``fuse_linear_bn_eval``
fold it into that layer's weight and bias. Dropout is the identity in eval mode. A
``MaskedModule`` (units zeroed inside an RNN or an attention) gets its parameter masks multiplied
into its parameters, so it runs its module directly (as exporters need).
"""
from __future__ import annotations

import copy

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from fxprune.modules.masked import MaskedModule

# layer -> the BatchNorm that normalises its output channels
FUSABLE = {
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
    nn.ConvTranspose1d: nn.BatchNorm1d,
    nn.ConvTranspose2d: nn.BatchNorm2d,
    nn.ConvTranspose3d: nn.BatchNorm3d,
    nn.Linear: nn.BatchNorm1d,
}
DROPOUT_FUNCTIONS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout,
}


def fuse_for_inference(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule in eval mode computing what ``gm`` computes in eval mode, with every
    foldable BatchNorm folded into the convolution or Linear layer before it, dropout removed and
    unused submodules deleted. ``gm`` is not changed.

    A BatchNorm folds when it is the only reader of the layer's output, both modules are called
    once, it tracks running statistics, a transposed convolution has ``groups == 1``, and the
    layer's output is batched: for a Linear, its recorded ``tensor_meta`` (as ``fxprune.trace``
    records it) must show a 2-D output, since BatchNorm1d normalises dim 1.

    >>> fused = fuse_for_inference(fxprune.trace(torchvision.models.resnet18(), x))
    >>> any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    False
    """
    gm = copy.deepcopy(gm).eval()
    modules = dict(gm.named_modules())
    calls = _call_counts(gm)
    for node in list(gm.graph.nodes):
        if _is_dropout(node, modules):
            node.replace_all_uses_with(node.args[0] if node.args else node.kwargs["input"])
            gm.graph.erase_node(node)
        elif _foldable(node, modules, calls):
            layer = node.args[0]
            bn, old = modules[node.target], modules[layer.target]
            if isinstance(old, nn.Linear):
                fused = fuse_linear_bn_eval(old, bn)
            else:
                fused = fuse_conv_bn_eval(old, bn, transpose=isinstance(old, nn.modules.conv._ConvTransposeNd))
            parent, _, name = layer.target.rpartition(".")
            setattr(gm.get_submodule(parent), name, fused)
            node.replace_all_uses_with(layer)
            gm.graph.erase_node(node)
    for name, module in list(gm.named_modules()):
        if isinstance(module, MaskedModule) and module.masked_names:
            gm.set_submodule(name, module.baked())
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def _is_dropout(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _DropoutNd)
    return node.op == "call_function" and node.target in DROPOUT_FUNCTIONS


def _foldable(node: torch.fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]) -> bool:
    if node.op != "call_module" or node.kwargs or len(node.args) != 1:
        return False
    layer = node.args[0]
    if not isinstance(layer, torch.fx.Node) or layer.op != "call_module" or len(layer.users) != 1:
        return False
    old, bn = modules[layer.target], modules[node.target]
    if FUSABLE.get(type(old)) is not type(bn) or bn.running_mean is None:
        return False
    # the fused module replaces the layer everywhere, so no other call or attribute read may see it
    if calls.get(layer.target, 0) != 1 or calls.get(node.target, 0) != 1:
        return False
    # BatchNorm normalises dim 1, which holds the layer's channels only where the output has rank
    # weight.dim(): not for an unbatched conv, nor for a Linear on (N, L, F)
    rank = _rank(layer)
    if rank != old.weight.dim() and (rank is not None or isinstance(old, nn.Linear)):
        return False
    # fuse_conv_bn_weights scales dim 1 of a transposed weight, which is out_channels / groups
    return not isinstance(old, nn.modules.conv._ConvTransposeNd) or old.groups == 1


def _call_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    """How often each module is called or has an attribute read, by qualified name."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
        elif node.op == "get_attr":
            owner = node.target.rpartition(".")[0]
            counts[owner] = counts.get(owner, 0) + 1
    return counts


def _rank(node: torch.fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if hasattr(meta, "shape") else None
