"""Training methods compared: dense, GrowEfficient, DST and SingleShot on MNIST-1D, and DST on an MLP.

Every method trains the 1-D ResNet of examples/common.py (``build_model(1)``: a width-32 stem, three
residual blocks, one downsampling block to width 64; 40.6K parameters, 2.31M FLOPs per signal) on
MNIST-1D (``fxprune.data.mnist1d()``: 4000 training and 1000 test signals of length 40, generated
offline) through examples/demo.py's ``train`` (``fxprune.methods.fit``), with one optimizer for all:
SGD, learning rate 0.1 decayed to 0 by a cosine over all steps, momentum 0.9, weight decay 5e-4,
batch 128 (the last partial batch dropped). A seed draws the initial weights (the same for every
method) and orders the batches (the same order for every method); the methods run in turn within
each seed, so that load from other processes falls on all of them alike. A run is timed, by the wall
clock and by the CPU time of the process (one torch thread), from the method's setup (GrowEfficient's
analysis and first resize, SingleShot's scoring and compaction) to its final compact model, without
evaluation. Inference FLOPs and parameters are ``fxprune.cost`` of that model on one signal;
training FLOPs are ``fit``'s count (3 forward passes per sample and step, of the model that
physically trains). Ratios are taken against the dense run of the same seed, then averaged.

Method settings, tuned on seed 0 (shorter runs included) and then run unchanged on every seed.
GrowEfficient: target 50% of the dense FLOPs; seed: the first 25% of every channel group and all
residual blocks on; reserve 15%; beta from 1 to 20; controller tolerance 0.01; lambda 0.5 and the
gates' SGD (lr 0.1, Nesterov momentum 0.9) as by default; a physical resize every 50 steps. (In the
tuning runs, the defaults beta_final=200, tol=0.05 and reserve 25% left the architecture 5-10% above
the target: growth came in steps of a quarter of each group, and the gates froze as beta grew.) DST: structured (one threshold per filter, on its norm),
alpha = 3e-4 (DST has no cost target; 2e-4 removed almost nothing and 5e-4 left 27% of the FLOPs).
SingleShot: 50% of the dense FLOPs chosen on the first training batch before training, then the
compact model re-initialised (``SingleShot.compact(reinit=True)``) and trained like the others.

DST as in the paper (unstructured: one threshold per neuron over single weights) trains LeNet-300-100
(64-300-100-10 with ReLU, on the flattened images) on scikit-learn's digits (``fxprune.data.digits()``:
1437 training and 360 test images) with the paper's optimizer (SGD, learning rate 0.01, constant,
momentum 0.9, batch 64, no weight decay) for --mlp-epochs epochs, alpha = 1.2e-3 (the paper's 5e-4 kept
62% of the weights after 100 epochs on this small dataset; 1e-3 kept 12% and 1.5e-3 4% after 300
epochs); the dense MLP trains with the same settings. Weights remaining: the fraction of the three
weight matrices that the masks keep (biases are not masked); the compact model drops the neurons
whose whole row is masked.

    python benchmarks/methods.py                          # 3 seeds; writes docs/benchmarks.md and the plot
    python benchmarks/methods.py --seeds 1 --epochs 2 --mlp-epochs 5 --no-doc
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

from report import ROOT, code_version, command, load_average, machine, write_section

sys.path.insert(0, str(ROOT / "examples"))
from common import Task, load_task, seed_everything  # noqa: E402  examples/common.py
from demo import Settings, train  # noqa: E402  examples/demo.py
from fxprune.methods.train import Record  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "methods.png"
SECTION = "## Training methods: GrowEfficient, DST, SingleShot"
METHODS = ("dense", "grow-efficient", "dst", "single-shot")
RESNET = Settings()  # examples/demo.py's defaults, as described above
MLP = Settings(epochs=300, batch_size=64, lr=0.01, momentum=0.9, weight_decay=0.0, cosine=False, alpha=1.2e-3,
               structured=False)
# method -> (accuracy within this many points of dense, inference FLOPs at most this fraction of dense's,
# training wall-clock at most this fraction of dense's or None); DST's target is on the MLP's weights
TARGETS = {"grow-efficient": (1.0, 0.5, 0.7), "single-shot": (2.0, 0.5, None)}
DST_TARGET = (1.0, 0.10)  # within this many points of dense with at most this fraction of the weights


def lenet_300_100(in_features: int = 64, num_classes: int = 10) -> nn.Sequential:
    """LeNet-300-100: flatten, then fully connected layers of 300 and 100 ReLU units and the classifier."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, num_classes))


def _step_times(history: list[Record]) -> list[float]:
    """Wall-clock seconds of each step after the first, without the resizes before them."""
    return [b.seconds - a.seconds - b.resize_seconds for a, b in zip(history, history[1:])]


def run_all(task: Task, make_model: Callable[[], nn.Module], settings: Settings, seeds: Sequence[int],
            methods: Sequence[str], log: Callable[[str], None] = print) -> list[dict]:
    """Train every method of ``methods`` (the first one is the reference, "dense") from the same
    initial model, for each seed; one row per run, its ratios against the reference of its seed."""
    rows = []
    for seed in seeds:
        reference = None
        for method in methods:
            seed_everything(seed)
            run = train(method, make_model(), task, settings, seed, progress=False, test_each_epoch=False)
            row = {
                "method": method, "seed": seed, "accuracy": run.accuracy, "flops": run.cost.flops,
                "params": run.cost.params, "train_flops": run.train_flops, "wall_s": run.seconds,
                "cpu_s": run.cpu_seconds, "step_ms": 1e3 * statistics.median(_step_times(run.history) or [0.0]),
                "resize_s": sum(r.resize_seconds for r in run.history),
                "error": run.check.error if run.check else 0.0, "exact": run.check.exact if run.check else True,
                "density": 1.0 if run.density is None else run.density,
            }
            if reference is None:
                reference = row
            row.update({f"{key}_ratio": row[key] / reference[key]
                        for key in ("flops", "params", "train_flops", "wall_s", "cpu_s")})
            row["points"] = 100 * (row["accuracy"] - reference["accuracy"])
            rows.append(row)
            log(f"{task.name} {method} seed {seed}: accuracy {run.accuracy:.2%}, FLOPs {row['flops_ratio']:.3f} "
                f"of dense, weights {row['density']:.1%}, {run.seconds:.1f} s wall / {run.cpu_seconds:.1f} s CPU")
    return rows


def resnet_runs(task: Task, settings: Settings, seeds: Sequence[int], log: Callable[[str], None] = print) -> list[dict]:
    """Dense, GrowEfficient, DST and SingleShot on ``task`` with the ResNet that fits it."""
    return run_all(task, task.model, settings, seeds, METHODS, log)


def mlp_runs(task: Task, settings: Settings, seeds: Sequence[int], log: Callable[[str], None] = print) -> list[dict]:
    """Dense and DST (as ``settings.structured`` says) on ``task`` with LeNet-300-100."""
    features = math.prod(task.train.tensors[0].shape[1:])
    return run_all(task, lambda: lenet_300_100(features, task.num_classes), settings, seeds, ("dense", "dst"), log)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict]) -> list[dict]:
    """Per method, in order of appearance: the mean and standard deviation of every number over the seeds."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        runs = [r for r in rows if r["method"] == method]
        summary = {"method": method, "seeds": len(runs)}
        for key, value in runs[0].items():
            if isinstance(value, float | int) and not isinstance(value, bool) and key != "seed":
                summary[key], summary[f"{key}_std"] = _mean_std([float(r[key]) for r in runs])
        summary["exact"] = all(r["exact"] for r in runs)
        out.append(summary)
    return out


def pm(s: dict, key: str, scale: float = 1.0, digits: int = 3) -> str:
    return f"{scale * s[key]:.{digits}f} ± {scale * s[f'{key}_std']:.{digits}f}"


def resnet_table(summary: list[dict]) -> str:
    """Mean ± std over the seeds, per method."""
    rows = [[s["method"], pm(s, "accuracy", 100, 2), f"{s['points']:+.2f}", f"{s['flops'] / 1e6:.3f}M",
             pm(s, "flops_ratio"), f"{s['params'] / 1e3:.1f}K", pm(s, "params_ratio"), pm(s, "train_flops_ratio"),
             pm(s, "wall_s", digits=1), pm(s, "wall_s_ratio", digits=2), pm(s, "cpu_s", digits=1),
             pm(s, "cpu_s_ratio", digits=2)] for s in summary]
    headers = ["method", "test accuracy %", "vs dense (points)", "inference FLOPs", "FLOPs / dense", "parameters",
               "params / dense", "training FLOPs / dense", "training wall s", "wall / dense", "training CPU s",
               "CPU / dense"]
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def runs_table(rows: list[dict]) -> str:
    """One line per run: every seed, so that nothing is hidden by the means."""
    body = [[r["method"], r["seed"], f"{100 * r['accuracy']:.2f}", f"{r['flops_ratio']:.3f}", f"{r['density']:.1%}",
             f"{r['train_flops_ratio']:.3f}", f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['step_ms']:.1f}",
             f"{r['resize_s']:.1f}" if r["method"] == "grow-efficient" else "",
             f"{r['error']:.1e}" if r["method"] != "dense" else ""] for r in rows]
    headers = ["method", "seed", "test accuracy %", "FLOPs / dense", "weights kept", "training FLOPs / dense",
               "wall s", "CPU s", "median step ms", "resizing s", "compact vs gated (max rel. diff.)"]
    return tabulate(body, headers, tablefmt="github", disable_numparse=True)


def mlp_table(summary: list[dict]) -> str:
    """Mean ± std over the seeds: accuracy and the weights DST keeps."""
    rows = [[s["method"], pm(s, "accuracy", 100, 2), f"{s['points']:+.2f}", pm(s, "density", 100, 2),
             f"{s['params']:,.0f}", pm(s, "params_ratio"), pm(s, "cpu_s", digits=1)] for s in summary]
    headers = ["method", "test accuracy %", "vs dense (points)", "weights remaining %", "compact model parameters",
               "params / dense", "training CPU s"]
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def targets(resnet: list[dict], mlp: list[dict]) -> list[str]:
    """The project targets, each met or missed, with the measured values (means over the seeds)."""
    by_method = {s["method"]: s for s in resnet}
    lines = []
    for method, (points, flops, wall) in TARGETS.items():
        s = by_method.get(method)
        if s is None:
            continue
        parts = [f"accuracy {s['points']:+.2f} points vs dense ({_verdict(s['points'] >= -points)}: "
                 f"allowed -{points:g})",
                 f"inference FLOPs {s['flops_ratio']:.3f} of dense ({_verdict(s['flops_ratio'] <= flops)}: "
                 f"allowed {flops:g})"]
        if wall is not None:
            parts.append(f"training wall-clock {s['wall_s_ratio']:.2f}x dense ({_verdict(s['wall_s_ratio'] <= wall)}: "
                         f"allowed {wall:g}x; CPU time {s['cpu_s_ratio']:.2f}x)")
        cost = f"at <= {flops:.0%} of the dense FLOPs" + (f", training in <= {wall:g}x its wall-clock" if wall else "")
        lines.append(f"- {method} within {points:g} point{'s' * (points != 1)} of dense {cost}: " + "; ".join(parts))
    dst = next((s for s in mlp if s["method"] == "dst"), None)
    if dst is not None:
        points, weights = DST_TARGET
        lines.append(f"- dst (unstructured, LeNet-300-100 on digits) within {points:g} point of dense with <= "
                     f"{weights:.0%} of the weights: accuracy {dst['points']:+.2f} points "
                     f"({_verdict(dst['points'] >= -points)}), weights remaining {dst['density']:.2%} "
                     f"({_verdict(dst['density'] <= weights)})")
    return lines


def time_breakdown(rows: list[dict], settings: Settings) -> str:
    """Where GrowEfficient's training time goes, against dense's, from the measured runs."""
    by_method = {s["method"]: s for s in summarize(rows)}
    ge, dense = by_method.get("grow-efficient"), by_method.get("dense")
    if ge is None or dense is None:
        return ""
    ratios = ", ".join(f"{r['wall_s_ratio']:.2f}" for r in rows if r["method"] == "grow-efficient")
    dense_steps = [r["step_ms"] for r in rows if r["method"] == "dense"]
    return (f"Training time: GrowEfficient's median step took {ge['step_ms']:.1f} ms against {dense['step_ms']:.1f} ms "
            f"for dense ({ge['step_ms'] / dense['step_ms']:.2f}x), while its physical model spent "
            f"{ge['train_flops_ratio']:.0%} of the dense training FLOPs: the gates (a sample and a multiply per "
            f"group and call, the expected-cost penalty through fxprune's Budget every step) add work that FLOPs "
            f"do not count, and a narrower convolution saves less time than FLOPs on this CPU at these sizes. Its "
            f"physical resizes (every {settings.resize_every} steps: analysis, compaction, growth and a new budget) "
            f"took {ge['resize_s']:.1f} s of {ge['wall_s']:.1f} s. Per seed, its wall-clock was {ratios} times dense's; dense's median step went from "
            f"{min(dense_steps):.1f} to {max(dense_steps):.1f} ms over the seeds, a measure of the load other "
            f"processes put on the machine meanwhile.")


def plot(rows: list[dict], path: Path) -> None:
    """Test accuracy against inference FLOPs (left) and training FLOPs (right), as fractions of
    dense: one dot per run, the mean with a standard-deviation bar per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, key, label in zip(axes, ("flops_ratio", "train_flops_ratio"),
                              ("inference FLOPs / dense", "training FLOPs / dense")):
        for i, (method, s) in enumerate(zip(methods, summarize(rows))):
            runs = [r for r in rows if r["method"] == method]
            colour = f"C{i}"
            ax.scatter([r[key] for r in runs], [100 * r["accuracy"] for r in runs], s=14, color=colour, alpha=0.4)
            ax.errorbar(s[key], 100 * s["accuracy"], xerr=s[f"{key}_std"], yerr=100 * s["accuracy_std"], fmt="o",
                        color=colour, capsize=3, label=method)
        ax.set(xlabel=label, xlim=(0, 1.1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy %")
    axes[0].legend(loc="lower right")
    fig.suptitle("1-D ResNet on MNIST-1D: accuracy against FLOPs (dots: seeds; bars: mean ± std)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def section(args: argparse.Namespace, settings: Settings, resnet_rows: list[dict], mlp_rows: list[dict],
            load: tuple | None, minutes: float) -> str:
    """The markdown section for docs/benchmarks.md."""
    end = load_average()
    loads = [f"load average (1 / 5 / 15 min) {' / '.join(f'{v:.1f}' for v in load)} at the start, "
             f"{' / '.join(f'{v:.1f}' for v in end)} at the end"] if load and end else []
    threads = f" ({args.threads} thread{'s' if args.threads > 1 else ''})"
    resnet, mlp = summarize(resnet_rows), summarize(mlp_rows)
    description = __doc__.split("\n\n")[1:-1]
    seeds = ", ".join(str(s) for s in dict.fromkeys(r["seed"] for r in resnet_rows))
    return "\n".join([
        SECTION, "",
        f"Command: `{command(__file__)}`", "",
        f"Machine: {machine(['no GPU'], threads, loads)}; "
        f"{datetime.date.today().isoformat()}, whole run {minutes:.1f} min.", "",
        f"Code: {code_version()}.", "",
        *[line for paragraph in description for line in (paragraph, "")],
        f"This run: seeds {seeds}; {args.epochs} epochs on MNIST-1D, {args.mlp_epochs} on digits.", "",
        "1-D ResNet on MNIST-1D (mean ± standard deviation over the seeds):", "",
        resnet_table(resnet), "",
        "Every run:", "",
        runs_table(resnet_rows), "",
        "LeNet-300-100 on digits, DST unstructured (mean ± standard deviation over the seeds):", "",
        mlp_table(mlp), "",
        f"![accuracy against FLOPs]({os.path.relpath(args.plot, args.doc.parent)})", "",
        "Project targets (means over the seeds):", "",
        *targets(resnet, mlp), "",
        time_breakdown(resnet_rows, settings), "",
        "The test sets are small: one MNIST-1D test signal is 0.1 point, one digits test image 0.28 point.", "",
    ])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the tables and, unless --no-doc, write the doc section and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n")[-1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. SEEDS-1 (default 3)")
    parser.add_argument("--epochs", type=int, default=RESNET.epochs, help="epochs on MNIST-1D")
    parser.add_argument("--mlp-epochs", type=int, default=MLP.epochs, help="epochs of the MLP on digits")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--plot", type=Path, default=PLOT)
    parser.add_argument("--no-doc", action="store_true", help="print the tables only; write no file")
    parser.add_argument("--json", type=Path, default=None, help="also save the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    load, start = load_average(), datetime.datetime.now()
    seeds = range(args.seeds)
    settings = replace(RESNET, epochs=args.epochs)
    resnet_rows = resnet_runs(load_task("mnist1d"), settings, seeds)
    mlp_rows = mlp_runs(load_task("digits"), replace(MLP, epochs=args.mlp_epochs), seeds)
    minutes = (datetime.datetime.now() - start).total_seconds() / 60
    print("\n" + resnet_table(summarize(resnet_rows)) + "\n\n" + mlp_table(summarize(mlp_rows)) + "\n")
    print("\n".join(targets(summarize(resnet_rows), summarize(mlp_rows))))
    if args.json:
        args.json.write_text(json.dumps({"resnet": resnet_rows, "mlp": mlp_rows}, indent=1))
    if not args.no_doc:
        plot(resnet_rows, args.plot)
        write_section(args.doc, SECTION, section(args, settings, resnet_rows, mlp_rows, load, minutes))
        print(f"wrote {args.doc} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
