"""Distributed training: GrowEfficient on one rank against two (torchrun, gloo on the CPU).

Runs examples/distributed.py under torchrun (``python -m torch.distributed.run --nproc_per_node=N
--master_addr=127.0.0.1`` with a free port) on 1 and on 2 ranks, in alternation for --rounds
rounds, so that load from other processes falls on both alike. The example trains GrowEfficient
on the 1-D ResNet of examples/common.py and MNIST-1D (4000 training signals) with the settings of
examples/demo.py (target 50% of the dense FLOPs, SGD with a cosine schedule, a resize every 50
steps) and a global batch of 128, split among the ranks (64 each on 2), so both train on the same
batches of one DistributedSampler order; rank 0 writes a checkpoint every 50 steps and after each
epoch. Each rank runs one torch thread. Wall seconds per epoch are fit's clock on rank 0 over
the whole run; CPU seconds per epoch are the CPU time of all ranks' processes during fit, summed.
Ratios are 2 ranks over 1 rank within a round. The final architecture is the number of units each
gate keeps on and the residual blocks kept; "same" compares it with the 1-rank run of the round.

The two ranks draw the same gate samples and average their gradients, so they train like one
process on their 128 samples, except that BatchNorm normalises each rank's 64 samples with their
own statistics, and that sums run in another order.

    python benchmarks/distributed.py                      # 10 epochs, 2 rounds; writes docs/benchmarks.md
    python benchmarks/distributed.py --epochs 2 --rounds 1 --no-doc
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

from report import ROOT, code_version, command, load_average, machine, write_section

EXAMPLE = ROOT / "examples" / "distributed.py"
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Distributed training: 1 rank against 2"
RANKS = (1, 2)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ranks: int, epochs: int, seed: int, folder: Path) -> dict:
    """Run the example on ``ranks`` ranks; its summary (examples/distributed.py --summary)."""
    summary = folder / f"summary-{ranks}.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                    "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(EXAMPLE), "--epochs", str(epochs),
                    "--seed", str(seed), "--quiet", "--checkpoint-dir", str(folder / f"checkpoints-{ranks}"),
                    "--summary", str(summary)],
                   check=True, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(summary.read_text())


def rows(runs: list[list[dict]]) -> list[list]:
    """One table row per run; ratios and the architecture against the 1-rank run of its round."""
    out = []
    for round_, (alone, *others) in enumerate(runs):
        for run in (alone, *others):
            wall, cpu = run["seconds"] / run["epochs"], run["cpu_seconds"] / run["epochs"]
            out.append([run["ranks"], round_, run["steps"], f"{wall:.2f}", f"{cpu:.2f}",
                        f"{wall / (alone['seconds'] / alone['epochs']):.2f}",
                        f"{cpu / (alone['cpu_seconds'] / alone['epochs']):.2f}", f"{run['flops']:,}",
                        f"{run['params']:,}", f"{100 * run['test_accuracy']:.2f}",
                        "yes" if run["architecture"] == alone["architecture"] else "NO"])
    return out


HEADERS = ("ranks", "round", "steps", "wall s / epoch", "CPU s / epoch (all ranks)", "wall / 1 rank",
           "CPU / 1 rank", "final FLOPs", "final params", "test accuracy %", "same architecture as 1 rank")


def section(args: argparse.Namespace, runs: list[list[dict]], load: tuple | None, minutes: float) -> str:
    end = load_average()
    loads = [f"load average (1 / 5 / 15 min) {' / '.join(f'{v:.1f}' for v in load)} at the start, "
             f"{' / '.join(f'{v:.1f}' for v in end)} at the end"] if load and end else []
    description = __doc__.split("\n\n")[1:-1]
    architecture = ", ".join(f"{k}: {v}" for k, v in runs[0][0]["architecture"].items())
    per_epoch = lambda run, key: run[key] / run["epochs"]  # noqa: E731
    wall = statistics.mean(per_epoch(two, "seconds") / per_epoch(one, "seconds") for one, two in runs)
    cpu = statistics.mean(per_epoch(two, "cpu_seconds") / per_epoch(one, "cpu_seconds") for one, two in runs)
    same = sum(one["architecture"] == two["architecture"] for one, two in runs)
    return "\n".join([
        SECTION, "",
        f"Command: `{command(__file__)}`", "",
        f"Machine: {machine(['no GPU', 'gloo over 127.0.0.1'], ' (1 thread per rank)', loads)}; "
        f"{datetime.date.today().isoformat()}, whole run {minutes:.1f} min.", "",
        f"Code: {code_version()}.", "",
        *[line for paragraph in description for line in (paragraph, "")],
        f"This run: {args.epochs} epochs, seed {args.seed}, {args.rounds} round(s).", "",
        tabulate(rows(runs), HEADERS, tablefmt="github"), "",
        f"Mean over the rounds: 2 ranks took {wall:.2f}x the wall-clock time and {cpu:.2f}x the CPU time of "
        f"1 rank per epoch; the final architecture was the same in {same} of {len(runs)} round(s).", "",
        f"Final architecture of the first 1-rank run (units on per gate; blocks kept): {architecture}.", "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n")[-1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--no-doc", action="store_true", help="print the table only; write no file")
    args = parser.parse_args(argv)
    load, start = load_average(), datetime.datetime.now()
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.rounds):
            runs.append([launch(n, args.epochs, args.seed, Path(folder)) for n in RANKS])
    minutes = (datetime.datetime.now() - start).total_seconds() / 60
    print(tabulate(rows(runs), HEADERS, tablefmt="github"))
    if not args.no_doc:
        write_section(args.doc, SECTION, section(args, runs, load, minutes))
        print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
