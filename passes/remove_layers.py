"""Remove residual branches: y = x + F(x) becomes y = x.

``zero_layers`` is the reference (y = x + 0·F(x): same parameters, same shapes); ``remove_layers``
erases the branch, then the modules and attributes that only it used.
"""
from __future__ import annotations

import torch
import torch.fx

from fxprune.layers import Layer, in_place


def zero_layers(gm: torch.fx.GraphModule, layers: list[Layer]) -> None:
    """Multiply the output of every branch in ``layers`` by 0, in place."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for layer in layers:
        out = nodes[layer.branch_out]
        with gm.graph.inserting_after(out):
            zero = gm.graph.call_function(torch.mul, (out, 0.0))
        zero.meta["tensor_meta"] = out.meta.get("tensor_meta")
        nodes[layer.add].replace_input_with(out, zero)
    gm.graph.lint()
    gm.recompile()


def remove_layers(gm: torch.fx.GraphModule, layers: list[Layer]) -> None:
    """Replace every branch in ``layers`` by its skip input, in place; a layer nested in another
    removed one goes with it."""
    if not layers:
        return
    nodes = {n.name: n for n in gm.graph.nodes}
    now = {}  # a removed add -> the name of the node that stands for it (its skip)
    attributes = set()
    for layer in layers:
        if layer.add not in nodes:  # inside a layer removed before
            continue
        skip = layer.skip
        while skip in now:  # the skip was itself the add of a layer removed before
            skip = now[skip]
        add = nodes.pop(layer.add)
        stand_in = nodes[skip]
        if any(in_place(gm, user) for user in add.users):  # it wrote into the add's fresh result: keep one
            with gm.graph.inserting_before(add):
                stand_in = gm.graph.call_method("clone", (stand_in,))
            stand_in.meta["tensor_meta"] = add.meta.get("tensor_meta")
        add.replace_all_uses_with(stand_in)
        gm.graph.erase_node(add)
        now[layer.add] = skip
        for name in reversed(layer.nodes):
            node = nodes.pop(name, None)
            if node is not None:
                if node.op == "get_attr":
                    attributes.add(node.target)
                gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    still = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in attributes - still:
        owner, _, name = target.rpartition(".")
        try:
            delattr(gm.get_submodule(owner), name)
        except AttributeError:  # its module is gone already
            pass
    gm.graph.lint()
    gm.recompile()
