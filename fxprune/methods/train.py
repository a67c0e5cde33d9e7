"""A training loop for the methods: penalties, gate optimizers, physical resizing, cost history.

``fit`` trains ``method.model`` (a :class:`GrowEfficient`, a :class:`DST`, or a plain module such
as the compacted result of :class:`SingleShot`). Every ``resize_every`` steps a method that can
(:meth:`GrowEfficient.resize`) drops what its gates switched off and grows what it needs, and
the weight optimizer follows (:func:`fxprune.remap_optimizer`, with its schedulers), so the model
that trains is physically the size of its current architecture. DST keeps its dense shapes while
training (its masks are per weight) and is compacted at the end (:meth:`DST.compact`).

``fit`` also trains on several ranks under ``torchrun`` (:mod:`.distributed`) and resumes a killed
run from its checkpoint (:mod:`.resume`).

Training FLOPs count forward plus backward as 3 times the forward FLOPs (the backward pass
computes gradients for activations and weights, each about as costly as the forward pass) of the
physical model, per sample: ``3 * cost(model, x[:1]).flops * batch size`` per step.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..cost import Cost, _si, cost
from ..optim import remap_optimizer
from .distributed import World, describe_sampler, fingerprint, sampler_problem, set_epoch
from .dst import DST
from .grow_efficient import GrowEfficient
from .resume import Checkpoints

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
        plot: str | Path | None = None, progress: bool = True, checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 100, resume: bool = False,
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

    ``checkpoint_dir`` keeps the training state there (:mod:`.resume`) every ``checkpoint_every``
    steps and after every epoch; with ``resume=True`` the run goes on from that state if there is
    one, and ends as it would have without the interruption.

    Where a torch.distributed process group is initialized (``torchrun``, :func:`.distributed.setup`),
    every rank calls ``fit`` with its shard of the data (``train_data`` sampled by a
    ``DistributedSampler``): the model trains in DistributedDataParallel, the history holds the
    loss, accuracy and training FLOPs of all ranks, and only rank 0 shows progress, plots and
    writes checkpoints (:mod:`.distributed`).
    """
    if epochs < 0:
        raise ValueError(f"epochs must be a non-negative number, got {epochs}")
    if resize_every is not None and resize_every < 1:
        raise ValueError(f"resize_every must be a positive number of steps or None, got {resize_every}")
    schedulers = list(schedulers)
    world = World.current()
    world.agree(_fingerprint(method, train_data, optimizer, schedulers, epochs=epochs, resize_every=resize_every,
                             checkpoint_every=checkpoint_every if checkpoint_dir is not None else None),
                sampler_problem(train_data, world))
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the checkpoint_dir to resume from")
    checkpoints = Checkpoints(checkpoint_dir, checkpoint_every, world) if checkpoint_dir is not None else None
    history: list[Record] = []
    spent, elapsed = 0.0, 0.0
    world.broadcast_random()
    restored = checkpoints.restore(method, _model, optimizer, schedulers, train_data) if resume else None
    if restored is not None:
        optimizer, state = restored
        history, spent, elapsed = [Record(**r) for r in state["history"]], state["train_flops"], state["seconds"]
    trainer = world.wrap(_model(method))
    start, sample, physical = time.perf_counter() - elapsed, None, None

    def checkpoint() -> None:
        own = {"history": [asdict(r) for r in history], "train_flops": spent, "seconds": time.perf_counter() - start}
        checkpoints.save(method, _model(method), optimizer, schedulers, train_data, own)

    per_epoch = len(train_data)
    with tqdm(total=epochs * per_epoch, initial=len(history), desc=type(method).__name__, unit="step",
              file=sys.stdout, dynamic_ncols=True, disable=not (progress and world.main)) as bar:
        for epoch in range(len(history) // max(per_epoch, 1), epochs):
            trainer.train()  # once per epoch: evaluation restores it, a resize keeps it
            set_epoch(train_data, epoch)
            done = len(history) - epoch * per_epoch
            for inputs, targets in checkpoints.epoch(train_data, done) if checkpoints else train_data:
                inputs, targets = _on(trainer, inputs, targets)
                sample = inputs[:1] if sample is None else sample
                if memory_format is not None and inputs.dim() == 4:
                    inputs = inputs.contiguous(memory_format=memory_format)
                resized = 0.0
                if isinstance(method, GrowEfficient) and resize_every and history and len(history) % resize_every == 0:
                    resized = time.perf_counter()
                    optimizer, physical = _resize(method, optimizer, schedulers, world), None
                    trainer = world.wrap(method.model)
                    resized = time.perf_counter() - resized
                physical = physical or cost(_physical(method), sample)  # it changes only when resized
                output, loss = _step(trainer, method, optimizer, schedulers, inputs, targets, loss_fn)
                loss, accuracy, samples = _batch_metrics(world, output, targets, loss)
                spent += TRAIN_FLOPS_PER_FORWARD * physical.flops * samples
                flops, params = _architecture(method, physical)
                history.append(Record(len(history) + 1, epoch, spent, flops, params, loss, accuracy,
                                      time.perf_counter() - start, resize_seconds=resized))
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.2f}", flops=_si(flops), params=_si(params))
                if checkpoints and checkpoints.due(len(history)) and len(history) % per_epoch:
                    checkpoint()
            world.broadcast_state(_model(method))  # rank 0's buffers, which the checkpoint holds
            if hasattr(method, "after_epoch"):
                method.after_epoch()
            if test_data is not None and history:
                right, total = world.sum(_correct(_model(method), test_data))
                history[-1].test_accuracy = right / max(total, 1)
                if progress and world.main:
                    bar.write(f"epoch {epoch + 1}/{epochs}: test accuracy {history[-1].test_accuracy:.2%}")
            if checkpoints:
                checkpoint()
    sample = sample if sample is not None else next(iter(train_data))[0][:1]  # a run resumed at its end
    result = FitResult(_final(method, sample), history, optimizer)
    if plot is not None and world.main:
        result.plot(plot)
    return result


def _fingerprint(method: GrowEfficient | DST | nn.Module, train_data: DataLoader, optimizer: torch.optim.Optimizer,
                 schedulers: list[Any], **settings: Any) -> dict[str, str]:
    """What the ranks of a distributed run must agree on (:func:`.distributed.fingerprint`)."""
    groups = [{k: v for k, v in g.items() if k != "params"} | {"parameters": len(g["params"])}
              for g in optimizer.param_groups]
    own = method.settings() if hasattr(method, "settings") else {}
    return fingerprint(_model(method), method.masks() if isinstance(method, GrowEfficient) else None,
                       method=type(method).__name__, **{f"{type(method).__name__}.{k}": v for k, v in own.items()},
                       optimizer=f"{type(optimizer).__name__} {groups}",
                       schedulers=[type(s).__name__ for s in schedulers], batches_per_epoch=len(train_data),
                       sampler=describe_sampler(train_data), **settings)


def _batch_metrics(world: World, output: torch.Tensor, targets: torch.Tensor,
                   loss: float) -> tuple[float, float, float]:
    """The step's mean task loss and accuracy, and its number of samples, over all ranks."""
    right = float((output.argmax(-1) == targets).sum())
    loss_sum, right, samples = world.sum([loss * len(targets), right, len(targets)])
    return loss_sum / samples, right / samples, samples


def _model(method: GrowEfficient | DST | nn.Module) -> nn.Module:
    """The module that trains."""
    return method.model if isinstance(method, (GrowEfficient, DST)) else method


def _physical(method: GrowEfficient | DST | nn.Module) -> nn.Module:
    """A plain module of the shapes that train: a GrowEfficient's ungated base, DST's finalized copy."""
    if isinstance(method, GrowEfficient):
        return method.base
    return method.finalize() if isinstance(method, DST) else method


def _step(trainer: nn.Module, method: GrowEfficient | DST | nn.Module, optimizer: torch.optim.Optimizer,
          schedulers: list[Any], inputs: torch.Tensor, targets: torch.Tensor,
          loss_fn: Callable) -> tuple[torch.Tensor, float]:
    """One optimizer step (and the gate optimizer's) of ``trainer``, the module that trains (in
    DistributedDataParallel on several ranks); returns the output and the task loss."""
    output = trainer(inputs)
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


def _resize(ge: GrowEfficient, optimizer: torch.optim.Optimizer, schedulers: list[Any],
            world: World) -> torch.optim.Optimizer:
    """Resize ``ge`` physically and carry the weight optimizer and its schedulers over. On several
    ranks, each resizes from rank 0's weights, buffers and random state, and the resulting
    architectures are compared."""
    world.broadcast_state(ge.model)
    world.broadcast_random()
    old = ge.model
    mapping = ge.resize()
    world.agree(fingerprint(ge.model, ge.masks()))
    return remap_optimizer(optimizer, old, ge.model, mapping, schedulers)


def _final(method: GrowEfficient | DST | nn.Module, sample: Any) -> nn.Module:
    if isinstance(method, GrowEfficient):
        return method.compact()[0]
    if isinstance(method, DST):
        return method.compact(sample)
    return method


def evaluate(model: nn.Module, data: DataLoader) -> float:
    """Accuracy of ``model`` in eval mode over ``data``; its mode is restored."""
    right, total = _correct(model, data)
    return right / max(total, 1)


@torch.no_grad()
def _correct(model: nn.Module, data: DataLoader) -> tuple[int, int]:
    """The number of samples of ``data`` that ``model`` (in eval mode) classifies right, and of all."""
    training = model.training
    model.eval()
    right = total = 0
    for inputs, targets in data:
        inputs, targets = _on(model, inputs, targets)
        right += int((model(inputs).argmax(-1) == targets).sum())
        total += len(targets)
    model.train(training)
    return right, total


def _on(module: nn.Module, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` on the device of ``module``'s parameters (a model on a GPU, batches from the CPU)."""
    device = next(module.parameters()).device
    return tuple(t.to(device, non_blocking=True) for t in tensors)


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

