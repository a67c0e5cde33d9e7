"""GrowEfficient on several processes: torchrun, DistributedDataParallel, resumable checkpoints.

Every rank builds the same 1-D ResNet (examples/common.py) and GrowEfficient, and trains on its
shard of MNIST-1D (``DistributedSampler``) with ``fxprune.methods.fit``, which wraps the gated
model in ``DistributedDataParallel``, keeps the gates and every resize identical on all ranks and
reduces the metrics; rank 0 shows the progress, writes a checkpoint every ``--checkpoint-every``
steps, and prints the final architecture. ``--batch-size`` is the global batch, split among the
ranks, so that 1 and N ranks train on the same batches. Kill a run and start it again with
``--resume``: it goes on from the last checkpoint and ends as the uninterrupted run would. It
trains on the CPU (gloo): GrowEfficient creates its gates on the CPU.

    torchrun --nproc_per_node=2 examples/distributed.py                 # 2 ranks
    torchrun --nproc_per_node=2 examples/distributed.py --resume        # go on after an interruption
    python examples/distributed.py                                      # one process
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

import fxprune
from fxprune import data
from fxprune.methods import GrowEfficient, fit
from fxprune.methods.distributed import World, setup

from common import Task, accuracy, parse, predict, run_arguments, seed_everything  # examples/common.py
from demo import Settings  # examples/demo.py: the settings that suit this model and dataset

CHECKPOINTS = Path(__file__).resolve().parent.parent / "out" / "distributed"


def arguments() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="global batch, split among ranks")
    parser.add_argument("--target", type=float, default=defaults.target,
                        help="FLOPs as a fraction of the dense model's")
    parser.add_argument("--samples", type=int, default=5000, help="MNIST-1D samples (80%% train, 20%% test)")
    parser.add_argument("--checkpoint-dir", type=Path, default=CHECKPOINTS)
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps")
    parser.add_argument("--resume", action="store_true", help="go on from the checkpoint in --checkpoint-dir")
    parser.add_argument("--summary", type=Path, help="write the result as JSON here (rank 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    run_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse(arguments(), argv)
    setup("gloo")
    world = World.current()
    if args.batch_size % world.size:
        raise SystemExit(f"--batch-size {args.batch_size} does not split among {world.size} ranks")
    settings = Settings(epochs=args.epochs, batch_size=args.batch_size, target=args.target)
    task = Task("mnist1d", *data.mnist1d(num_samples=args.samples), spatial_dims=1)
    seed_everything(args.seed)  # the same initial model on every rank
    x = task.test.tensors[0][:1]
    ge = GrowEfficient(task.model(), x, target=settings.target, metric="flops", epochs=settings.epochs,
                       **settings.grow_efficient)
    ge.resize()
    sampler = DistributedSampler(task.train, num_replicas=world.size, rank=world.rank, seed=args.seed)
    loader = DataLoader(task.train, batch_size=args.batch_size // world.size, sampler=sampler, drop_last=True)
    optimizer = torch.optim.SGD(ge.weights(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.epochs * len(loader))
    cpu = time.process_time()
    result = fit(ge, loader, settings.epochs, optimizer, schedulers=[scheduler], resize_every=settings.resize_every,
                 checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, resume=args.resume,
                 progress=not args.quiet)
    cpu_seconds = world.sum([time.process_time() - cpu])[0]  # of all ranks
    if world.main:
        final = fxprune.cost(result.model, x)
        summary = {
            "ranks": world.size, "epochs": settings.epochs, "steps": len(result.history),
            "seconds": result.history[-1].seconds, "cpu_seconds": cpu_seconds,
            "architecture": {k: int(v.sum()) if isinstance(v, torch.Tensor) else bool(v)
                             for k, v in ge.masks().items()},
            "flops": final.flops, "params": final.params,
            "test_accuracy": accuracy(predict(result.model, task.test), task.test),
        }
        print(f"{world.size} rank(s): {summary['steps']} steps in {summary['seconds']:.1f} s; "
              f"final architecture {summary['architecture']}; {final.flops:,} FLOPs, {final.params:,} parameters; "
              f"test accuracy {summary['test_accuracy']:.2%}")
        if args.summary is not None:
            args.summary.write_text(json.dumps(summary, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
