"""A training loop for the methods: penalties, gate optimizers, physical resizing, cost history.

``fit`` trains ``method.model`` (a :class:`GrowEfficient`, a :class:`DST`, or a plain module such
as the compacted result of :class:`SingleShot`). Every ``resize_every`` steps a method that can
(:meth:`GrowEfficient.resize`) drops what its gates switched off and grows what it needs, and
the weight optimizer follows (:func:`fxprune.remap_optimizer`, with its schedulers), so the model
that trains is physically the size of its current architecture. DST keeps its dense shapes while
training (its masks are per weight) and is compacted at the end (:meth:`DST.compact`).

Training FLOPs count forward plus backward as 3 times the forward FLOPs (the backward pass
computes gradients for activations and weights, each about as costly as the forward pass) of the
physical model, per sample: ``3 * cost(model, x[:1]).flops * batch size`` per step.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..cost import Cost, _si, cost
from ..optim import remap_optimizer
from .dst import DST
from .grow_efficient import GrowEfficient

TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward, in forward passes


@dataclass
class Record:
    """One row of the training history."""

    step: int
    epoch: int
    train_flops: float  # FLOPs spent training so far
    flops: int  # inference FLOPs of one sample with the current architecture
    params: int  # parameters of the current architecture
    loss: float  # task loss of the step's batch (without penalty)
    accuracy: float  # accuracy on the step's batch (training mode)
    seconds: float  # wall-clock time since the start
    test_accuracy: float | None = None  # at the end of an epoch, if test data was given
    resize_seconds: float = 0.0  # wall-clock time of the physical resize before this step, if any


@dataclass
class FitResult:
    """What :func:`fit` returns: the final model (compacted where the method can be), the history,
    and the weight optimizer over the last physical model."""

    model: nn.Module
    history: list[Record] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None

    def plot(self, path: str | Path) -> None:
        """Save a PNG of inference FLOPs and accuracy over the training steps."""
        plot_history(self.history, path)


def fit(method: GrowEfficient | DST | nn.Module, train_data: DataLoader, epochs: int, optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        schedulers: Iterable[Any] = (), resize_every: int | None = 50, test_data: DataLoader | None = None,
        plot: str | Path | None = None, progress: bool = True,
        memory_format: torch.memory_format | None = None) -> FitResult:
    """Train ``method`` for ``epochs`` over ``train_data`` (batches ``(inputs, class indices)``).

    ``optimizer`` holds the weights (for GrowEfficient, ``ge.weights()``; the gates have their own
    ``ge.gate_optimizer``, stepped here too); ``schedulers`` are stepped after every optimizer step.
    The loss is ``loss_fn(output, targets)`` plus the method's ``penalty()``; ``after_step()`` and
    ``after_epoch()`` are called where the method has them. A GrowEfficient is resized every
    ``resize_every`` steps (None: never); call ``ge.resize()`` before building the optimizer to
    start at the physical size of the seed and its reserve. ``test_data`` is evaluated after
    every epoch. ``plot`` saves :func:`plot_history` there. ``memory_format``: 4-D input batches
    are laid out so (``torch.channels_last`` makes CPU convolutions faster, and their time fall
    with their width where the default layout pads channels to the vector width). Returns the
    final model: for GrowEfficient ``ge.compact()``, for DST ``dst.compact(x[:1])``, else the
    trained module.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be a non-negative number, got {epochs}")
    if resize_every is not None and resize_every < 1:
        raise ValueError(f"resize_every must be a positive number of steps or None, got {resize_every}")
    schedulers = list(schedulers)
    history: list[Record] = []
    start, spent, sample, physical = time.perf_counter(), 0.0, None, None
    with tqdm(total=epochs * len(train_data), desc=type(method).__name__, unit="step", file=sys.stdout,
              dynamic_ncols=True, disable=not progress) as bar:
        for epoch in range(epochs):
            _model(method).train()  # once per epoch: evaluation restores it, a resize keeps it
            for inputs, targets in train_data:
                sample = inputs[:1] if sample is None else sample
                if memory_format is not None and inputs.dim() == 4:
                    inputs = inputs.contiguous(memory_format=memory_format)
                resized = 0.0
                if isinstance(method, GrowEfficient) and resize_every and history and len(history) % resize_every == 0:
                    resized = time.perf_counter()
                    optimizer, physical = _resize(method, optimizer, schedulers), None
                    resized = time.perf_counter() - resized
                physical = physical or cost(_physical(method), sample)  # it changes only when resized
                output, loss = _step(method, optimizer, schedulers, inputs, targets, loss_fn)
                spent += TRAIN_FLOPS_PER_FORWARD * physical.flops * len(inputs)
                flops, params = _architecture(method, physical)
                accuracy = float((output.argmax(-1) == targets).float().mean())
                history.append(Record(len(history) + 1, epoch, spent, flops, params, loss, accuracy,
                                      time.perf_counter() - start, resize_seconds=resized))
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.2f}", flops=_si(flops), params=_si(params))
            if hasattr(method, "after_epoch"):
                method.after_epoch()
            if test_data is not None and history:
                history[-1].test_accuracy = evaluate(_model(method), test_data)
                if progress:
                    bar.write(f"epoch {epoch + 1}/{epochs}: test accuracy {history[-1].test_accuracy:.2%}")
    result = FitResult(_final(method, sample), history, optimizer)
    if plot is not None:
        result.plot(plot)
    return result


def _model(method: GrowEfficient | DST | nn.Module) -> nn.Module:
    """The module that trains."""
    return method.model if isinstance(method, (GrowEfficient, DST)) else method


def _physical(method: GrowEfficient | DST | nn.Module) -> nn.Module:
    """A plain module of the shapes that train: a GrowEfficient's ungated base, DST's finalized copy."""
    if isinstance(method, GrowEfficient):
        return method.base
    return method.finalize() if isinstance(method, DST) else method


def _step(method: GrowEfficient | DST | nn.Module, optimizer: torch.optim.Optimizer, schedulers: list[Any],
          inputs: torch.Tensor, targets: torch.Tensor, loss_fn: Callable) -> tuple[torch.Tensor, float]:
    """One optimizer step (and the gate optimizer's); returns the output and the task loss."""
    output = _model(method)(inputs)
    loss = loss_fn(output, targets)
    total = loss + method.penalty() if hasattr(method, "penalty") else loss
    optimizers = [optimizer, *([method.gate_optimizer] if isinstance(method, GrowEfficient) else [])]
    for o in optimizers:
        o.zero_grad(set_to_none=True)
    total.backward()
    for o in optimizers:
        o.step()
    for s in schedulers:
        s.step()
    if hasattr(method, "after_step"):
        method.after_step()
    return output.detach(), float(loss.detach())


def _architecture(method: GrowEfficient | DST | nn.Module, physical: Cost) -> tuple[int, int]:
    """Inference FLOPs per sample and parameters of the current architecture: a GrowEfficient's
    gates that are on (its cost as a fraction of the physical model's), else the physical model."""
    if not isinstance(method, GrowEfficient):
        return physical.flops, physical.params
    arch = method.cost()
    return round(physical.flops * arch.flops / method.budget.dense["flops"]), arch.params


def _resize(ge: GrowEfficient, optimizer: torch.optim.Optimizer, schedulers: list[Any]) -> torch.optim.Optimizer:
    """Resize ``ge`` physically and carry the weight optimizer and its schedulers over."""
    old = ge.model
    mapping = ge.resize()
    return remap_optimizer(optimizer, old, ge.model, mapping, schedulers)


def _final(method: GrowEfficient | DST | nn.Module, sample: Any) -> nn.Module:
    if isinstance(method, GrowEfficient):
        return method.compact()[0]
    if isinstance(method, DST):
        return method.compact(sample)
    return method


@torch.no_grad()
def evaluate(model: nn.Module, data: DataLoader) -> float:
    """Accuracy of ``model`` in eval mode over ``data``; its mode is restored."""
    training = model.training
    model.eval()
    right = total = 0
    for inputs, targets in data:
        right += int((model(inputs).argmax(-1) == targets).sum())
        total += len(targets)
    model.train(training)
    return right / max(total, 1)


def plot_history(history: list[Record], path: str | Path) -> None:
    """Save a PNG: inference FLOPs per sample and parameters (top), training and test accuracy
    (bottom), over the training steps. Drawn off screen (matplotlib's Agg canvas); pyplot's
    backend is left alone."""
    from matplotlib.figure import Figure

    steps = [r.step for r in history]
    fig = Figure(figsize=(7, 6))
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(steps, [r.flops for r in history], label="inference FLOPs / sample")
    top.set_ylabel("FLOPs")
    right = top.twinx()
    right.plot(steps, [r.params for r in history], "--", color="tab:orange", label="parameters")
    right.set_ylabel("parameters")
    top.legend(handles=top.get_lines() + right.get_lines(), loc="best")
    bottom.plot(steps, [r.accuracy for r in history], alpha=0.4, label="train (batch)")
    tested = [r for r in history if r.test_accuracy is not None]
    if tested:
        bottom.plot([r.step for r in tested], [r.test_accuracy for r in tested], "o-", label="test")
    bottom.set_xlabel("step")
    bottom.set_ylabel("accuracy")
    bottom.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)

