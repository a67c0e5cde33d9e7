"""Helpers shared by the examples: seeding, exactness and latency measurement, the result table.

The examples run as scripts (``python examples/demo.py``), which puts this folder on
``sys.path``; their tests add it before loading them.
"""
from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tabulate import tabulate
from torch import nn


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
