"""Helpers shared by the examples: the residual CNN and its datasets, seeding, exactness and
latency measurement, the result table.

The examples run as scripts (``python examples/demo.py``), which puts this folder on
``sys.path``; their tests add it before loading them.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fxprune import data

TOLERANCE = 1e-4  # largest allowed |apply_masks - compact|, relative to the largest output


# --------------------------------------------------------------------------- model


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (identity, or a strided 1x1 conv-BN projection), then ReLU."""

    def __init__(self, conv: type[nn.Module], norm: type[nn.Module], c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = conv(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = norm(c_out)
        # the identity shortcut is the input itself, not an nn.Identity call, so that the trace sees
        # y = x + F(x) and the branch is a removable layer
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride=stride, bias=False), norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + (x if self.shortcut is None else self.shortcut(x)))


def build_model(spatial_dims: int = 1, in_channels: int = 1, num_classes: int = 10,
                width: int = 32, blocks: int = 3) -> nn.Sequential:
    """A small ResNet: stem conv, ``blocks`` identity blocks, one downsampling block (2x width),
    global average pool and a linear classifier. ``spatial_dims`` is 1 (signals) or 2 (images)."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d}[spatial_dims]
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[spatial_dims]
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}[spatial_dims]
    return nn.Sequential(
        conv(in_channels, width, 5 if spatial_dims == 1 else 3, padding="same", bias=False),
        norm(width),
        nn.ReLU(),
        *[ResidualBlock(conv, norm, width, width) for _ in range(blocks)],
        ResidualBlock(conv, norm, width, 2 * width, stride=2),
        pool(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


def cifar_resnet(depth: int = 20, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> nn.Sequential:
    """The CIFAR ResNet of He et al. (2016): a 3x3 stem, three stages of (depth - 2) / 6 residual
    blocks of ``width``, 2 x ``width`` and 4 x ``width`` channels (the first block of the last two
    downsamples, with a 1x1 projection), global average pooling and a linear classifier. Depth 20
    and width 16 is ResNet-20."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, ...), got {depth}")
    n = (depth - 2) // 6
    blocks, c_in = [], width
    for stage, c_out in enumerate((width, 2 * width, 4 * width)):
        for i in range(n):
            blocks.append(ResidualBlock(nn.Conv2d, nn.BatchNorm2d, c_in, c_out, stride=2 if stage and not i else 1))
            c_in = c_out
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))


# --------------------------------------------------------------------------- data


@dataclass
class Task:
    """A named dataset, and the number of spatial dims of the model that fits it."""

    name: str
    train: TensorDataset
    test: TensorDataset
    spatial_dims: int

    @property
    def num_classes(self) -> int:
        """One more than the largest label of either split."""
        return int(max(self.train.tensors[1].max(), self.test.tensors[1].max())) + 1

    @property
    def in_channels(self) -> int:
        """Channels of one input sample."""
        return self.train.tensors[0].shape[1]

    def model(self, **kwargs: int) -> nn.Sequential:
        """:func:`build_model` for this task's inputs and classes."""
        return build_model(self.spatial_dims, self.in_channels, self.num_classes, **kwargs)


def load_task(name: str, path: str | Path | None = None, image_size: int = 32) -> Task:
    """``"mnist1d"`` ((N, 1, 40) signals, generated offline), ``"digits"`` ((N, 1, 8, 8) images) or
    ``"digits32"`` (the same upscaled to (N, 1, 32, 32));
    with ``path``, the user's images instead: CIFAR-10's python batches (a folder holding
    ``data_batch_1``, or ``cifar-10-batches-py``) or one folder per class, resized to
    ``image_size`` x ``image_size``."""
    if path is not None:
        folder = Path(path)
        if (folder / "data_batch_1").is_file() or (folder / "cifar-10-batches-py").is_dir():
            return Task("cifar10", *data.cifar10(folder), spatial_dims=2)
        return Task(folder.name, *data.image_folder(folder, size=(image_size, image_size)), spatial_dims=2)
    if name == "mnist1d":
        return Task(name, *data.mnist1d(), spatial_dims=1)
    if name == "digits":
        return Task(name, *data.digits(), spatial_dims=2)
    if name == "digits32":  # CIFAR-sized: upscaled to 32 x 32
        return Task(name, *data.digits(size=32), spatial_dims=2)
    raise ValueError(f"unknown dataset {name!r}")


# --------------------------------------------------------------------------- measurement


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def predict(model: nn.Module, dataset: TensorDataset, batch_size: int = 1000) -> torch.Tensor:
    """Logits of ``model`` (in eval mode) on the whole of ``dataset``."""
    model.eval()
    return torch.cat([model(x) for x, _ in DataLoader(dataset, batch_size=batch_size)])


def accuracy(logits: torch.Tensor, dataset: TensorDataset) -> float:
    """Fraction of samples whose arg-max logit is the label."""
    return (logits.argmax(1) == dataset.tensors[1]).float().mean().item()


def max_relative_error(reference: torch.Tensor, output: torch.Tensor) -> float:
    """``max |reference - output|`` divided by ``max |reference|``."""
    return ((reference - output).abs().max() / reference.abs().max().clamp_min(1e-12)).item()


@torch.no_grad()
def latencies(models: Sequence[Callable[[torch.Tensor], object]], x: torch.Tensor, repeats: int = 30,
              warmup: int = 5) -> list[float]:
    """Median seconds per forward pass of each model on ``x``.

    Models are timed in alternation, so load from other processes affects them alike.
    """
    for m in models:
        if isinstance(m, nn.Module):
            m.eval()
        for _ in range(warmup):
            m(x)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for m, t in zip(models, times):
            start = time.perf_counter()
            m(x)
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def ms(seconds: float) -> str:
    """``seconds`` in milliseconds, for a table cell."""
    return f"{seconds * 1e3:.3f} ms"


def ratio(before: float, after: float) -> str:
    """``before / after`` as ``"2.00x"`` (``"-"`` when ``after`` is 0)."""
    return f"{before / after:.2f}x" if after else "-"


def table(rows: list[list[str]], headers: Sequence[str]) -> str:
    """A GitHub-markdown table: the first column (row names) left-aligned, the others right."""
    return tabulate(rows, list(headers), tablefmt="github",
                    colalign=("left", *["right"] * (len(headers) - 1)))


def run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options every example shares: --seed and --threads."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: stable timings on a shared machine)")


def pruning_arguments(parser: argparse.ArgumentParser, keep_help: str) -> None:
    """Add --keep and the :func:`run_arguments`."""
    parser.add_argument("--keep", type=float, default=0.5, help=keep_help)
    run_arguments(parser)


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``, check the fractions --keep and --target where present, and set the torch
    thread count."""
    args = parser.parse_args(argv)
    for name in ("keep", "target"):
        value = getattr(args, name, None)
        if value is not None and not 0 < value <= 1:
            parser.error(f"--{name} must be in (0, 1], got {value}")
    torch.set_num_threads(args.threads)
    return args


def finish(start: float, error: float | None, reference: str = "apply_masks") -> int:
    """Print the run time; the exit status: 1 if the compact model differed from ``reference`` by
    ``error`` (relative) beyond TOLERANCE (None: no equality to check)."""
    print(f"\ntotal time {time.perf_counter() - start:.1f} s")
    if error is not None and not error < TOLERANCE:
        print(f"FAILED: compact model differs from {reference} by {error:.2e} (relative)", file=sys.stderr)
        return 1
    return 0
