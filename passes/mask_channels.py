"""Zero masked channels where they leave their producer: the reference semantics of pruning."""
from __future__ import annotations

import torch
import torch.fx
from torch import nn

from fxprune.labels import Producer


def zero_point(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node:
    """Where a producer's channels are zeroed: after a BatchNorm that directly follows it."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module" and users[0].args[:1] == (node,):
        if isinstance(gm.get_submodule(users[0].target), nn.modules.batchnorm._BatchNorm):
            return users[0]
    return node


def mask_channels(gm: torch.fx.GraphModule, masks: dict[str, tuple[Producer, torch.Tensor]]) -> None:
    """Multiply each producer's output by its channel mask, in place (out[c] <- out[c] * keep[c])."""
    if not masks:
        return
    nodes = {n.name: n for n in gm.graph.nodes}
    for node_name, (producer, mask) in masks.items():
        at = zero_point(gm, nodes[node_name])
        meta = at.meta["tensor_meta"]
        shape = [1] * len(meta.shape)
        shape[producer.dim] = -1
        name = _free_name(gm, f"{producer.name.replace('.', '_')}_channel_mask")
        gm.register_buffer(name, mask.to(meta.dtype).reshape(shape))
        with gm.graph.inserting_after(at):
            attr = gm.graph.get_attr(name)
        with gm.graph.inserting_after(attr):
            masked = gm.graph.call_function(torch.mul, (at, attr))
        at.replace_all_uses_with(masked, delete_user_cb=lambda user: user is not masked)
        masked.meta["tensor_meta"] = meta
    gm.graph.lint()
    gm.recompile()


def _free_name(gm: torch.fx.GraphModule, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name
