"""Copies of module trees and GraphModules that share no tensor with the original and cost a
shallow copy per module (``copy.deepcopy`` walks every attribute of every module and every node).
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.fx
from torch import nn
from torch.fx.graph_module import _CodeOnlyModule

Tensors = Callable[[torch.Tensor], torch.Tensor]

# What GraphModule.__init__ does not carry over and GraphModule.__deepcopy__ copies explicitly.
GRAPH_MODULE_STATE = ("_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def copy_modules(root: nn.Module, tensor: Tensors, private: bool = True) -> nn.Module:
    """A copy of ``root``'s module tree in which every module is a shallow copy and every parameter
    and buffer ``t`` is ``tensor(t)``. A module or tensor reached under several names stays one
    object. ``private``: the copy is handed out, so its other tensors are ``tensor(t)`` too and its
    dicts, lists and sets are copied one level (setting a hook or an attribute on it leaves ``root``
    alone); else (a throwaway shadow) they are shared."""
    memo: dict[int, object] = {}

    def copy_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is not None and id(t) not in memo:
            memo[id(t)] = tensor(t)
        return None if t is None else memo[id(t)]

    def copy_module(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        new = memo[id(m)] = m.__class__.__new__(m.__class__)
        state = m.__dict__.copy()
        if private:
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    state[k] = copy_tensor(v)
                elif isinstance(v, (dict, list, set)):
                    state[k] = v.copy()
        state["_modules"] = {name: None if c is None else copy_module(c) for name, c in m._modules.items()}
        state["_parameters"] = {name: copy_tensor(t) for name, t in m._parameters.items()}
        state["_buffers"] = {name: copy_tensor(t) for name, t in m._buffers.items()}
        object.__setattr__(new, "__dict__", state)
        if isinstance(new, nn.RNNBase):  # its flat weight list still holds the old tensors
            new._init_flat_weights()
        return new

    return copy_module(root)


def copy_graph_module(gm: torch.fx.GraphModule, tensor: Tensors) -> torch.fx.GraphModule:
    """A new GraphModule with a copy of ``gm``'s graph (node metadata included) and of its module
    tree (:func:`copy_modules`), as ``copy.deepcopy(gm)`` gives, but with tensor ``t`` replaced by
    ``tensor(t)``."""
    body = dict(copy_modules(gm, tensor).__dict__)
    body["_graph"] = graph = copy.deepcopy(gm.graph)
    new = torch.fx.GraphModule(_CodeOnlyModule(body), graph, type(gm).__name__)
    for attr in GRAPH_MODULE_STATE:
        if attr in gm.__dict__:
            setattr(new, attr, copy.copy(gm.__dict__[attr]))
    new.meta = copy.deepcopy(gm.meta)
    return new
