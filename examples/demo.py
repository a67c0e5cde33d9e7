"""Grow and prune a residual CNN while it trains (GrowEfficient), then compare it with the dense one.

GrowEfficient starts from a seed of a quarter of every group's channels, grows and prunes channels
and residual blocks with sampled gates toward a FLOPs budget, and resizes the model physically as
it goes (``fxprune.methods.fit``); the final architecture is compacted, without fine-tuning. A
dense copy trains with the same optimizer, batches and epochs. The table compares the two
(parameters, FLOPs, CPU latency, test accuracy, training FLOPs and time); the compact model is
checked against the method's gated model with hard gates in eval mode on the whole test set; the
FLOPs and accuracy over training are saved as a PNG.

    python examples/demo.py                          # MNIST-1D, 1-D ResNet, 50% of the dense FLOPs
    python examples/demo.py --dataset digits         # scikit-learn digits, 2-D ResNet
    python examples/demo.py --method single-shot     # choose channels at initialisation, then train
    python examples/demo.py --method dst             # Dynamic Sparse Training of whole filters
    python examples/demo.py --data-path ~/data/cifar-10-batches-py --epochs 30   # your images
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import fxprune
from fxprune.methods import DST, GrowEfficient, SingleShot, fit
from fxprune.methods.train import Record

from common import (  # examples/common.py
    TOLERANCE, Task, accuracy, finish, latencies, load_task, max_relative_error, ms, parse, predict, ratio,
    run_arguments, seed_everything, table,
)
from common import build_model  # noqa: F401  (re-exported: the model is also known as examples/demo.py:build_model)

METHODS = ("grow-efficient", "single-shot", "dst")
PLOT = Path(__file__).resolve().parent.parent / "out" / "demo_training.png"


@dataclass
class Settings:
    """How every method trains (one optimizer, batch size and number of epochs for all), and each
    method's own parameters. The defaults suit the 1-D ResNet on MNIST-1D."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.1  # SGD with momentum and weight decay
    momentum: float = 0.9
    weight_decay: float = 5e-4
    cosine: bool = True  # cosine decay of the learning rate over all steps (else constant)
    target: float = 0.5  # GrowEfficient and SingleShot: FLOPs as a fraction of the dense model's
    grow_efficient: dict[str, float] = field(  # GrowEfficient's own arguments (a "target" overrides the above)
        default_factory=lambda: {"seed": 0.25, "reserve": 0.15, "beta_final": 20.0, "tol": 0.01})
    resize_every: int = 50  # GrowEfficient: steps between physical resizes
    channels_last: bool = False  # 4-D inputs in channels-last layout (faster CPU convolutions)
    round_to: int | None = None  # SingleShot: channel counts at its multiples (GrowEfficient: in grow_efficient)
    alpha: float = 3e-4  # DST: weight of the threshold penalty
    structured: bool = True  # DST: whole filters (False: single weights, as in the paper)


@dataclass
class Check:
    """The final model against the method's own model with hard gates, in eval mode."""

    reference: str  # what the final model was compared with
    error: float  # max |reference - final| / max |reference| over the test set
    exact: bool  # whether the method promises equality here
    note: str = ""

    def __str__(self) -> str:
        verdict = ("equal" if self.error < TOLERANCE else "NOT EQUAL") if self.exact else "not expected to be equal"
        text = f"compact model vs {self.reference}: max relative difference {self.error:.2e} ({verdict}"
        return text + (f": {self.note})" if self.note else ")")


@dataclass
class Run:
    """One training run: the final model and what it cost."""

    method: str
    model: nn.Module  # the final model, compacted where the method can be
    history: list[Record]
    accuracy: float  # on the test set
    cost: fxprune.Cost  # of the final model on one sample
    train_flops: float  # spent training (fit's count: 3 forward passes per sample and step)
    seconds: float  # wall-clock of training, the method's setup included
    cpu_seconds: float  # CPU time of this process over the same span
    check: Check | None = None
    density: float | None = None  # DST: the fraction of the masked layers' weights that stay
    report: str = ""  # the method's own summary: gates, thresholds or kept channels


def train(method: str, model: nn.Module, task: Task, settings: Settings, seed: int = 0,
          plot: str | Path | None = None, progress: bool = True, test_each_epoch: bool = True) -> Run:
    """Train ``method`` ("dense" or one of :data:`METHODS`) from ``model``, which is left as it is, with
    :func:`fxprune.methods.fit`; ``seed`` orders the batches. The final model is compared with the
    method's gated model with hard gates (GrowEfficient: the gates ``s > 0``; DST: the masked weights;
    SingleShot: ``apply_masks`` of its masks, before training) on the test set."""
    if method not in ("dense", *METHODS):
        raise ValueError(f"method must be 'dense' or one of {METHODS}, got {method!r}")
    loader = DataLoader(task.train, batch_size=settings.batch_size, shuffle=True,
                        drop_last=len(task.train) > settings.batch_size,
                        generator=torch.Generator().manual_seed(seed))
    test = DataLoader(task.test, batch_size=1000)
    x = task.test.tensors[0][:1]
    start, cpu_start = time.perf_counter(), time.process_time()
    if method == "grow-efficient":
        trainee = GrowEfficient(model, x, metric="flops", epochs=settings.epochs,
                                **{"target": settings.target, **settings.grow_efficient})
        trainee.resize()  # train at the seed's physical size from the first step
        weights = trainee.weights()
    elif method == "dst":
        trainee = DST(model, alpha=settings.alpha, structured=settings.structured)
        weights = trainee.model.parameters()
    elif method == "single-shot":
        ss = SingleShot(model, x)
        # the first batch the training loader draws
        batch = next(iter(DataLoader(task.train, batch_size=settings.batch_size, shuffle=True,
                                     generator=torch.Generator().manual_seed(seed))))
        masks = ss.masks(batch, F.cross_entropy, target=settings.target, metric="flops", round_to=settings.round_to)
        trainee = ss.compact(masks, reinit=True, round_to=settings.round_to)  # trained from scratch, as in the paper
        weights = trainee.parameters()
    else:
        trainee = copy.deepcopy(model)
        weights = trainee.parameters()
    optimizer = torch.optim.SGD(weights, lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.epochs * len(loader))] \
        if settings.cosine else []
    result = fit(trainee, loader, settings.epochs, optimizer, schedulers=schedulers,
                 resize_every=settings.resize_every, test_data=test if test_each_epoch else None, plot=plot,
                 progress=progress, memory_format=torch.channels_last if settings.channels_last else None)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    final = result.model.eval()
    check = density = None
    report = ""
    if method == "grow-efficient":
        check = _grow_efficient_check(trainee, final, task)
        report = trainee.report()
    elif method == "single-shot":  # the pruning step, on the untrained model
        reference = fxprune.apply_masks(model, masks, x, analysis=ss.analysis)
        small = ss.compact(masks, round_to=settings.round_to)
        error = max_relative_error(predict(reference, task.test), predict(small, task.test))
        check = Check("apply_masks of its masks, at initialisation", error, exact=True)
        report = "kept channels: " + ", ".join(f"{k} {int(m.sum())}/{len(m)}" for k, m in masks.items())
    elif method == "dst":
        error = max_relative_error(predict(trainee.finalize(), task.test), predict(final, task.test))
        check = Check("the trained model with its masks", error, exact=True)
        density, report = trainee.density(), trainee.report()
    return Run(method, final, result.history, accuracy(predict(final, task.test), task.test),
               fxprune.cost(final, x), result.history[-1].train_flops, seconds, cpu_seconds, check, density, report)


def _grow_efficient_check(ge: GrowEfficient, final: nn.Module, task: Task) -> Check:
    """The compact model against ``ge.model`` in eval mode (gates ``s > 0``). They differ where a
    group has every gate off: ``ge.masks()`` keeps its best unit, or the compaction removes the
    residual block around it while the gated block still adds its BatchNorm's bias."""
    error = max_relative_error(predict(ge.model, task.test), predict(final, task.test))
    layers = set(ge.budget.layers)
    off = [key for key, gate in ge.gates().items() if key not in layers and not bool((gate.weight > 0).any())]
    note = f"every gate of {', '.join(off)} is off (GrowEfficient's documented exception)" if off else ""
    return Check("the gated model with hard gates", error, exact=not off, note=note)


# --------------------------------------------------------------------------- main


@dataclass
class Result:
    """What :func:`run` produced."""

    dense: Run
    method: Run
    rows: list[list[str]]


def run(task: Task, method: str = "grow-efficient", settings: Settings | None = None, seed: int = 0,
        plot: str | Path | None = None, timing_repeats: int = 30, progress: bool = True,
        log: Callable[[str], None] = print) -> Result:
    """Train a dense model and ``method`` from the same initial model, and compare them."""
    settings = settings or Settings()
    seed_everything(seed)
    model = task.model()
    x = task.test.tensors[0][:1]
    log(f"dataset {task.name}: {len(task.train)} train / {len(task.test)} test samples of shape "
        f"{tuple(x.shape[1:])}, {task.num_classes} classes; {settings.epochs} epochs of SGD (lr {settings.lr}, "
        f"momentum {settings.momentum}, weight decay {settings.weight_decay}), batch {settings.batch_size}")
    dense = train("dense", model, task, settings, seed, progress=progress)
    trained = train(method, model, task, settings, seed, plot=plot, progress=progress)
    log(f"\n{method}:\n{trained.report}\n{trained.check}")

    models, batch = [dense.model, trained.model], task.test.tensors[0][:256]
    lat1 = latencies(models, x, timing_repeats)
    lat_batch = latencies(models, batch, max(5, timing_repeats // 3))
    rows = [
        _compare("parameters", dense.cost.params, trained.cost.params, "{:,}".format),
        _compare("FLOPs (batch 1)", dense.cost.flops, trained.cost.flops, "{:,}".format),
        _compare("CPU latency, batch 1", *lat1, ms),
        _compare(f"CPU latency, batch {len(batch)}", *lat_batch, ms),
        ["test accuracy", f"{dense.accuracy:.2%}", f"{trained.accuracy:.2%}",
         f"{100 * (trained.accuracy - dense.accuracy):+.1f} points"],
        _compare("training FLOPs", dense.train_flops, trained.train_flops, "{:.3g}".format),
        _compare("training time (wall)", dense.seconds, trained.seconds, "{:.1f} s".format),
        _compare("training time (CPU)", dense.cpu_seconds, trained.cpu_seconds, "{:.1f} s".format),
    ]
    if trained.density is not None:
        rows.append(["weights kept by the masks", "100%", f"{trained.density:.1%}", ratio(1, trained.density)])
    return Result(dense, trained, rows)


def _compare(name: str, dense: float, compact: float, show: Callable[[float], str]) -> list[str]:
    """A table row: both values shown by ``show``, and their ratio."""
    return [name, show(dense), show(compact), ratio(dense, compact)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=METHODS, default="grow-efficient")
    parser.add_argument("--dataset", choices=["mnist1d", "digits"], default="mnist1d")
    parser.add_argument("--data-path", metavar="PATH",
                        help="your images instead: CIFAR-10's python batches or one folder per class (2-D ResNet)")
    parser.add_argument("--image-size", type=int, default=32, metavar="SIZE",
                        help="images of a class folder are resized to SIZE x SIZE (default 32)")
    parser.add_argument("--target", type=float, default=0.5,
                        help="FLOPs to reach, as a fraction of the dense model's (grow-efficient, single-shot)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs of each model (default 20)")
    parser.add_argument("--alpha", type=float, default=Settings.alpha,
                        help=f"DST's threshold penalty weight (default {Settings.alpha:g})")
    parser.add_argument("--dst-unstructured", action="store_true",
                        help="DST masks single weights (the paper's form) instead of whole filters")
    parser.add_argument("--plot", type=Path, default=PLOT, help=f"the training curves' PNG (default {PLOT})")
    run_arguments(parser)
    args = parse(parser, argv)

    start = time.perf_counter()
    task = load_task(args.dataset, args.data_path, args.image_size)
    settings = Settings(epochs=args.epochs, target=args.target, alpha=args.alpha, structured=not args.dst_unstructured)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    result = run(task, args.method, settings, args.seed, plot=args.plot)
    print(f"\n{torch.get_num_threads()} CPU threads\n")
    print(table(result.rows, ["", "dense", args.method, "dense / compact"]))
    print(f"\ntraining curves: {args.plot}")
    check = result.method.check
    return finish(start, check.error if check.exact else None, check.reference)


if __name__ == "__main__":
    sys.exit(main())
