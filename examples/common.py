"""Helpers shared by the examples: seeding, exactness and latency measurement, the result table.

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

import numpy as np
import torch
from tabulate import tabulate
from torch import nn

TOLERANCE = 1e-4  # largest allowed |apply_masks - compact|, relative to the largest output


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


def pruning_arguments(parser: argparse.ArgumentParser, keep_help: str) -> None:
    """Add the options every example shares: --keep, --seed and --threads."""
    parser.add_argument("--keep", type=float, default=0.5, help=keep_help)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: stable timings on a shared machine)")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``, check --keep and set the torch thread count."""
    args = parser.parse_args(argv)
    if not 0 < args.keep <= 1:
        parser.error(f"--keep must be in (0, 1], got {args.keep}")
    torch.set_num_threads(args.threads)
    return args


def finish(start: float, error: float) -> int:
    """Print the run time; the exit status: 1 if compact differed from apply_masks by ``error``
    (relative) beyond TOLERANCE."""
    print(f"\ntotal time {time.perf_counter() - start:.1f} s")
    if not error < TOLERANCE:
        print(f"FAILED: compact model differs from apply_masks by {error:.2e} (relative)", file=sys.stderr)
        return 1
    return 0
