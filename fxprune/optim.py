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
    groups: list[list[nn.Parameter]] = [[] for _ in optimizer.param_groups]
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
        groups[last].append(p)
        if source is not None and source in optimizer.state:
            state[p] = {k: _carry(v, m, source, p) for k, v in optimizer.state[source].items()}
    new = optimizer_like(optimizer, groups)
    new.state.update(state)
    rebind_schedulers(schedulers, optimizer, new)
    return new


def optimizer_like(optimizer: torch.optim.Optimizer, groups: list[list[nn.Parameter]]) -> torch.optim.Optimizer:
    """A new optimizer of ``optimizer``'s class and defaults over ``groups``, one list of parameters
    per parameter group of ``optimizer``, each with that group's hyperparameters; without state."""
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"{len(groups)} parameter groups given for an optimizer of {len(optimizer.param_groups)}")
    param_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": params}
                    for g, params in zip(optimizer.param_groups, groups)]
    return type(optimizer)(param_groups, **_accepted(type(optimizer), optimizer.defaults))


def rebind_schedulers(schedulers: Iterable[Any], old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Point each of ``schedulers`` (learning-rate schedulers of ``old``) at ``new``, so that its
    schedule goes on there."""
    for s in schedulers:
        _rebind(s, old, new)


def named_state_dict(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """``optimizer.state_dict()`` with the name in ``model`` of every parameter of every group, so
    that :func:`load_named_state_dict` can put it back on a rebuilt copy of ``model``."""
    names = {id(p): n for n, p in model.named_parameters()}
    unnamed = [i for g in optimizer.param_groups for i, p in enumerate(g["params"]) if id(p) not in names]
    if unnamed:
        raise FxpruneError(f"the optimizer trains {len(unnamed)} parameter(s) that the model does not have")
    return {"names": [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups],
            "state": optimizer.state_dict()}


def load_named_state_dict(optimizer: torch.optim.Optimizer, model: nn.Module,
                          saved: dict[str, Any]) -> torch.optim.Optimizer:
    """A new optimizer like ``optimizer`` over the parameters of ``model`` that ``saved`` (from
    :func:`named_state_dict`) names, with their saved state and hyperparameters. Raises
    :class:`FxpruneError` naming a parameter that ``model`` lacks or whose state has another shape."""
    params = dict(model.named_parameters())
    missing = [n for group in saved["names"] for n in group if n not in params]
    if missing:
        raise FxpruneError(f"the saved optimizer trains parameter(s) {missing[:5]} that the model does not have")
    new = optimizer_like(optimizer, [[params[n] for n in group] for group in saved["names"]])
    new.load_state_dict(saved["state"])
    for name in (n for group in saved["names"] for n in group):
        p = params[name]
        wrong = [k for k, v in new.state.get(p, {}).items()
                 if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape]
        if wrong:
            raise FxpruneError(f"the saved optimizer state {wrong} of parameter '{name}' has another shape than "
                               f"the parameter {tuple(p.shape)}")
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
