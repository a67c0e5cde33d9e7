"""Train a small residual CNN, prune its channels by filter magnitude, and compact it.

The pruned model is checked against fxprune's reference semantics (``apply_masks``) on the
whole test set, then compared with the original for size, FLOPs, CPU latency and accuracy.

    python examples/magnitude_pruning.py                    # MNIST-1D, 1-D ResNet
    python examples/magnitude_pruning.py --dataset digits   # scikit-learn digits, 2-D ResNet
    python examples/magnitude_pruning.py --keep 0.25 --finetune 0

Pruning after training by a fixed rule; ``examples/demo.py`` learns what to keep while training.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import fxprune

from common import (  # examples/common.py
    TOLERANCE, Task, accuracy, build_model, finish, latencies, load_task, max_relative_error, ms, parse,
    predict, pruning_arguments, ratio, seed_everything, table,
)

Masks = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- training


def train(model: nn.Module, dataset: TensorDataset, epochs: int, lr: float = 3e-3,
          batch_size: int = 128, desc: str = "train") -> nn.Module:
    """Train ``model`` in place with Adam and cross-entropy (cosine learning-rate decay)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) > batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs * len(loader)))
    model.train()
    bar = tqdm(range(epochs), desc=desc, unit="epoch", file=sys.stdout, leave=True, dynamic_ncols=True)
    for _ in bar:
        total = 0.0
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(x)
        bar.set_postfix(loss=f"{total / len(loader.dataset):.3f}")
    return model.eval()


# --------------------------------------------------------------------------- pruning


def unit_scores(group: fxprune.ChannelGroup, model: nn.Module) -> torch.Tensor:
    """Score each unit of ``group`` by the summed L2 norm of its producers' output filters.

    A producer's output filters are the slices along dim 0 of its ``weight`` (or of the tensor
    itself, for a parameter used directly); units fed by several producers (e.g. the channels
    of a residual stream) add up the norms of all their filters.
    """
    params = dict(model.named_parameters())
    filters = {f"{p}.weight" for p in group.producers} | set(group.producers)
    scores = torch.zeros(group.size)
    for m in group.members:
        if m.kind == "param" and m.dim == 0 and m.name in filters and m.name in params:
            w = params[m.name].detach()[m.index]
            scores.index_add_(0, m.unit, w.reshape(len(m.index), -1).norm(dim=1))
    return scores


def magnitude_masks(analysis: fxprune.Analysis, model: nn.Module, keep: float) -> Masks:
    """For every prunable group, keep the ``keep`` fraction (at least one) of highest-scoring units."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    masks = {}
    for g in analysis.groups:
        if g.prunable:
            n = max(1, round(keep * g.size))
            mask = torch.zeros(g.size, dtype=torch.bool)
            mask[unit_scores(g, model).topk(n).indices] = True
            masks[g.name] = mask
    return masks


# --------------------------------------------------------------------------- main


@dataclass
class Result:
    """What :func:`run` produced."""

    model: nn.Module
    compact: nn.Module
    analysis: fxprune.Analysis
    masks: Masks
    error: float  # max |apply_masks - compact| / max |apply_masks| on the test set
    cost_before: fxprune.Cost
    cost_after: fxprune.Cost
    rows: list[list[str]]


def run(task: Task, epochs: int = 10, keep: float = 0.5, seed: int = 0, finetune: int = 0,
        timing_repeats: int = 30, log: Callable[[str], None] = print) -> Result:
    """Train, prune by magnitude, compact, check exactness and compare before/after."""
    seed_everything(seed)
    model = build_model(task.spatial_dims)
    x_example = task.test.tensors[0][:1]
    log(f"dataset {task.name}: {len(task.train)} train / {len(task.test)} test samples of shape "
        f"{tuple(x_example.shape[1:])}")
    train(model, task.train, epochs)

    analysis = fxprune.analyze(model, x_example)
    log("\nchannel groups:\n" + str(analysis) + "\n")
    masks = magnitude_masks(analysis, model, keep)
    reference = fxprune.apply_masks(model, masks, x_example, analysis=analysis).eval()
    small = fxprune.compact(model, masks, x_example, analysis=analysis).eval()

    logits_small = predict(small, task.test)
    error = max_relative_error(predict(reference, task.test), logits_small)
    log(f"exactness: max |apply_masks - compact| / max |apply_masks| = {error:.2e} "
        f"on {len(task.test)} test samples (tolerance {TOLERANCE:.0e})")

    acc_before, acc_after = accuracy(predict(model, task.test), task.test), accuracy(logits_small, task.test)
    cost_before, cost_after = fxprune.cost(model, x_example), fxprune.cost(small, x_example)
    x_batch = task.test.tensors[0][:256]
    lat1 = latencies([model, small], x_example, timing_repeats)
    lat256 = latencies([model, small], x_batch, max(5, timing_repeats // 3))
    rows = [
        ["parameters", f"{cost_before.params:,}", f"{cost_after.params:,}", ratio(cost_before.params, cost_after.params)],
        ["FLOPs (batch 1)", f"{cost_before.flops:,}", f"{cost_after.flops:,}", ratio(cost_before.flops, cost_after.flops)],
        ["CPU latency, batch 1", ms(lat1[0]), ms(lat1[1]), ratio(*lat1)],
        ["CPU latency, batch 256", ms(lat256[0]), ms(lat256[1]), ratio(*lat256)],
        ["test accuracy", f"{acc_before:.2%}", f"{acc_after:.2%}", ""],
    ]
    if finetune > 0:
        train(small, task.train, finetune, lr=1e-3, desc="fine-tune compact")
        rows.append(["test accuracy after fine-tuning", "", f"{accuracy(predict(small, task.test), task.test):.2%}",
                     f"({finetune} epochs)"])
    return Result(model, small, analysis, masks, error, cost_before, cost_after, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["mnist1d", "digits"], default="mnist1d")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    pruning_arguments(parser, "fraction of each prunable group to keep")
    parser.add_argument("--finetune", type=int, default=3, help="epochs to fine-tune the compact model (0: none)")
    args = parse(parser, argv)

    start = time.perf_counter()
    result = run(load_task(args.dataset), args.epochs, args.keep, args.seed, args.finetune)
    kept = sum(int(m.sum()) for m in result.masks.values())
    total = sum(len(m) for m in result.masks.values())
    print(f"\npruned {len(result.masks)} prunable groups by filter magnitude, kept {kept}/{total} channels "
          f"(--keep {args.keep}); {torch.get_num_threads()} CPU threads\n")
    print(table(result.rows, ["", "original", "compact", "ratio"]))
    return finish(start, result.error)


if __name__ == "__main__":
    sys.exit(main())
