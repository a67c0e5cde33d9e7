"""Carry an optimizer, its state and its learning-rate schedulers over a rewrite of the model."""
from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import FxpruneError
from .mapping import Mapping, TensorMap


def remap_optimizer(optimizer: torch.optim.Optimizer, old_model: nn.Module, new_model: nn.Module,
                    mapping: Mapping, schedulers: Iterable[Any] = ()) -> torch.optim.Optimizer:
    """An optimizer of the same class over ``new_model``'s parameters, for the rewrite ``mapping``
    (from ``compact(..., return_mapping=True)`` or ``grow``) that turned ``old_model`` into it.

    Hyperparameters and parameter groups are kept: a parameter joins the group of the one it comes
    from, a new one the group of the parameter before it if this optimizer trains that one (so a
    second optimizer over other parameters, such as gates, does not take it). Per-parameter state (SGD's momentum,
    Adam's ``exp_avg``/``exp_avg_sq``, ...) is sliced to the kept entries and zero for new ones;
    scalar state (Adam's ``step``) is copied. Each of ``schedulers`` (learning-rate schedulers of
    ``optimizer``) is pointed at the new optimizer, so its schedule goes on. ``optimizer`` itself
    is not changed.
    """
    old = dict(old_model.named_parameters(remove_duplicate=False))
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in optimizer.param_groups]
    state, last = {}, None  # the group of the parameter before, if this optimizer trains it
    for name, p in new_model.named_parameters():
        if name not in mapping:
            raise FxpruneError(f"the mapping says nothing of parameter '{name}' of the new model")
        m = mapping[name]
        source = old.get(m.source) if m.source is not None else None
        if m.source is not None and source is None:
            raise FxpruneError(f"parameter '{name}' comes from '{m.source}', which old_model does not have")
        if source is not None:
            last = group_of.get(id(source))  # None: the optimizer does not train its source (frozen, or another optimizer's)
        if last is None:
            continue
        groups[last]["params"].append(p)
        if source is not None and source in optimizer.state:
            state[p] = {k: _carry(v, m, source, p) for k, v in optimizer.state[source].items()}
    new = type(optimizer)(groups, **_accepted(type(optimizer), optimizer.defaults))
    new.state.update(state)
    for s in schedulers:
        _rebind(s, optimizer, new)
    return new


def _accepted(cls: type, defaults: dict) -> dict:
    """The defaults that ``cls``'s constructor takes (the rest live in the parameter groups)."""
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(defaults)
    return {k: v for k, v in defaults.items() if k in params}


def _carry(value: Any, m: TensorMap, old: torch.Tensor, new: torch.Tensor) -> Any:
    """One entry of a parameter's state: per-entry tensors follow the mapping, the rest is copied."""
    if isinstance(value, torch.Tensor) and value.shape == old.shape and value.dim() > 0:
        return m.carry(value, new.shape)
    return value.clone() if isinstance(value, torch.Tensor) else value


def _rebind(scheduler: Any, old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    if getattr(scheduler, "optimizer", None) is not old:
        raise FxpruneError(f"{type(scheduler).__name__} does not schedule the optimizer being remapped")
    scheduler.optimizer = new
    _count_steps(new)
    for inner in getattr(scheduler, "_schedulers", ()):  # ChainedScheduler, SequentialLR
        _rebind(inner, old, new)


def _count_steps(optimizer: torch.optim.Optimizer) -> None:
    """Mark ``optimizer.step`` the way LR schedulers do when they attach, so that they can tell a
    step happened (and do not warn that ``step`` was replaced)."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    step, owner = optimizer.step, weakref.ref(optimizer)

    @functools.wraps(step)
    def counted(*args, **kwargs):
        owner()._opt_called = True
        return step(*args, **kwargs)

    counted._wrapped_by_lr_sched = True
    optimizer.step = counted
