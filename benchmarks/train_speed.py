"""Training speed: dense against GrowEfficient, SingleShot and DST (structured), in seconds.

Every method trains a CIFAR ResNet (examples/common.py's ``cifar_resnet``: ResNet-20, three stages of
3 residual blocks, --width channels in the first stage, twice and four times that in the others) on
32 x 32 images: scikit-learn's digits upscaled (``fxprune.data.digits(size=32)``: 1437 training
and 360 test images, offline), or CIFAR-10 with --data-path. All methods share examples/demo.py's
``train`` (``fxprune.methods.fit``) with one optimizer (SGD, learning rate 0.1 decayed to 0 by a
cosine, momentum 0.9, weight decay 5e-4, batch 128), the same epochs, the same initial weights and
the same batch order per seed, and channels-last input batches (``fit(memory_format=
torch.channels_last)``; in the default layout a CPU convolution pads its channels to the vector
width, so its time hardly falls with width). GrowEfficient: target 49% of the dense FLOPs (its
proportional controller settles within about its tolerance, 0.01, of the target: this lands at or
below 50%), its seed the first half of every group's channels and every residual block, a reserve of
15% kept while the architecture is below the target, beta from 1 to 20, a physical resize every 22
steps (2 epochs), channel counts not rounded (rounding would make it train a wider model: see
``GrowEfficient``). SingleShot: 50% of the dense FLOPs chosen on the first batch, with channel counts
at --round-to multiples, then the compact model re-initialised and trained. DST: structured (a
threshold per filter), alpha 5e-5, trained at the dense shapes and compacted at the end; it has no
FLOPs target.

Each run is a fresh subprocess with one torch thread, the methods in turn within each seed, so that
load from other processes falls on all of them alike. Wall and CPU seconds (of that process) run
from the method's setup (GrowEfficient's analysis and first resize, SingleShot's scoring and
compaction) to its final compact model, without evaluation; peak memory is the process's largest
resident set during that span (VmHWM, reset at its start) minus its resident set at the start.
Inference FLOPs are ``fxprune.cost`` of the final model on one image; training FLOPs are fit's count
(3 forward passes per sample and step of the model that physically trains). Ratios are against the
dense run of the same seed, then averaged.

Three further measurements, each in its own subprocess, show where time goes:

- the step time of plain models at the final architectures (the seed-0 models, re-trained as plain
  modules) against the dense model, in both memory layouts: how this CPU's time falls with width;
- a GrowEfficient step (gated model, sampled gates, penalty, both optimizers) against a plain step of
  its ungated model at the same physical size (``ge.base``), the two alternating;
- ``ge.resize()`` per call (CPU seconds, median), between randomly moved logits, on the benchmark's
  ResNet and on torchvision's resnet50 (1 x 3 x 224 x 224).

    python benchmarks/train_speed.py                  # 3 seeds; writes docs/benchmarks.md and the plot
    python benchmarks/train_speed.py --seeds 1 --epochs 1 --width 8 --no-doc
    python benchmarks/train_speed.py --data-path ~/data/cifar-10-batches-py --epochs 30
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

from methods import pm, summarize  # benchmarks/methods.py
from report import ROOT, code_version, command, load_average, machine, write_section

DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "train_speed.png"
SECTION = "## Training speed: dense against GrowEfficient, SingleShot and DST"
METHODS = ("dense", "grow-efficient", "single-shot", "dst")
# method -> (accuracy within this many points of dense, inference FLOPs at most this fraction of dense's,
# training wall-clock at most this fraction of dense's)
TARGETS = {"grow-efficient": (1.0, 0.5, 0.7), "single-shot": (1.0, 0.5, 0.6)}
# GrowEfficient's controller settles within about tol of its target: 0.49 lands at or below 50%
GROW_EFFICIENT = {"target": 0.49, "seed": 0.5, "reserve": 0.15, "beta_final": 20.0, "tol": 0.01}
OVERHEAD_TARGET = 1.10  # a GrowEfficient step against a plain step of the same physical model
RESIZE_TARGET = ("resnet50", 0.15)  # seconds per resize


# --------------------------------------------------------------------------- workers (run in subprocesses)


def _setup(job: dict):
    """Import what the workers use, on one thread; examples/ on sys.path."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "examples"))
    import common
    import demo

    return torch, common, demo


def _task(job: dict, common):
    return common.load_task("digits32", job.get("data_path"))


def _model(job: dict, task, common):
    return common.cifar_resnet(job["depth"], task.in_channels, task.num_classes, job["width"])


def _settings(job: dict, demo):
    return demo.Settings(epochs=job["epochs"], channels_last=True, round_to=job["round_to"], resize_every=22,
                         alpha=5e-5, grow_efficient=GROW_EFFICIENT)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def train_worker(job: dict) -> dict:
    """Train ``job["method"]`` once; its row, and the final model saved to ``job["save"]``."""
    torch, common, demo = _setup(job)
    import fxprune

    task = _task(job, common)
    common.seed_everything(job["seed"])
    model = _model(job, task, common)
    gc.collect()
    baseline = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the resident set now
    run = demo.train(job["method"], model, task, _settings(job, demo), job["seed"], progress=False,
                     test_each_epoch=False)
    peak = max(0, _rss_kib("VmHWM") - baseline)  # pages freed meanwhile can leave the mark below the start
    steps = [b.seconds - a.seconds - b.resize_seconds for a, b in zip(run.history, run.history[1:])]
    if job.get("save"):
        fxprune.save(run.model, job["save"])
    return {"method": job["method"], "seed": job["seed"], "accuracy": run.accuracy, "flops": run.cost.flops,
            "params": run.cost.params, "train_flops": run.train_flops, "wall_s": run.seconds, "cpu_s": run.cpu_seconds,
            "peak_mib": peak / 1024, "step_ms": 1e3 * statistics.median(steps or [0.0]),
            "resize_s": sum(r.resize_seconds for r in run.history),
            "resizes": sum(r.resize_seconds > 0 for r in run.history),
            "exact": run.check.exact and run.check.error < 1e-4 if run.check else True}


def _timed_steps(torch, models: dict, x, y, repeats: int) -> dict[str, float]:
    """Median CPU seconds of a plain SGD step of each model, the models taking turns."""
    import torch.nn.functional as F

    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}

    def step(k):
        optimizers[k].zero_grad()
        F.cross_entropy(models[k](x), y).backward()
        optimizers[k].step()

    for k in models:
        step(k)
    times = {k: [] for k in models}
    for _ in range(repeats):
        for k in models:
            start = time.process_time()
            step(k)
            times[k].append(time.process_time() - start)
    return {k: statistics.median(t) for k, t in times.items()}


def widths_worker(job: dict) -> dict:
    """Step time of the final models (loaded from ``job["models"]``) against the dense model, in
    the default and the channels-last layout."""
    torch, common, _ = _setup(job)
    import fxprune

    task = _task(job, common)
    torch.manual_seed(0)
    models = {"dense": _model(job, task, common).train()}
    models.update({name: fxprune.load(path).train() for name, path in job["models"].items()})
    for m in models.values():  # plain training from fresh weights, as a model of that shape would train
        for module in m.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    x, y = task.train.tensors[0][:128], task.train.tensors[1][:128]
    out = {}
    for layout in ("contiguous", "channels_last"):
        xs = x.contiguous(memory_format=getattr(torch, f"{layout}_format" if layout == "contiguous" else layout))
        seconds = _timed_steps(torch, models, xs, y, job["repeats"])
        out[layout] = {k: {"ms": 1e3 * v, "ratio": v / seconds["dense"]} for k, v in seconds.items()}
    out["flops"] = {k: fxprune.cost(m, x[:1]).flops / fxprune.cost(models["dense"], x[:1]).flops
                    for k, m in models.items()}
    return out


def overhead_worker(job: dict) -> dict:
    """A GrowEfficient step against a plain step of ``ge.base`` (the same physical model), alternating."""
    torch, common, _ = _setup(job)
    import copy

    import torch.nn.functional as F

    from fxprune.methods import GrowEfficient

    task = _task(job, common)
    torch.manual_seed(0)
    x = task.train.tensors[0][:128].contiguous(memory_format=torch.channels_last)
    y = task.train.tensors[1][:128]
    ge = GrowEfficient(_model(job, task, common), x[:1], target=0.5, epochs=20, seed=0.5)
    ge.resize()
    optimizer = torch.optim.SGD(ge.weights(), lr=0.01, momentum=0.9)
    plain = copy.deepcopy(ge.base).train()
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)

    def gated_step():
        loss = F.cross_entropy(ge.model(x), y) + ge.penalty()
        optimizer.zero_grad()
        ge.gate_optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ge.gate_optimizer.step()
        ge.cost()  # what fit shows every step

    def plain_step():
        plain_optimizer.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        plain_optimizer.step()

    for _ in range(2):
        gated_step(), plain_step()
    gated, ungated = [], []
    for i in range(job["repeats"]):
        for f, times in ((gated_step, gated), (plain_step, ungated))[:: 1 if i % 2 else -1]:
            start = time.process_time()
            f()
            times.append(time.process_time() - start)
    return {"gated_ms": 1e3 * statistics.median(gated), "plain_ms": 1e3 * statistics.median(ungated),
            "ratio": statistics.median(g / p for g, p in zip(gated, ungated)),
            "physical_flops": ge.budget.dense["flops"] / GrowEfficient(_model(job, task, common), x[:1],
                                                                       epochs=2).budget.dense["flops"]}


def resize_worker(job: dict) -> dict:
    """CPU seconds of ``ge.resize()`` per call (median), each after random moves of the logits."""
    torch, common, _ = _setup(job)
    from fxprune.methods import GrowEfficient
    from fxprune.zoo import torchvision_models

    if job["model"] == "resnet50":
        model, x = torchvision_models().resnet50(), torch.randn(1, 3, 224, 224)
    else:
        task = _task(job, common)
        model, x = _model(job, task, common), task.train.tensors[0][:1]
    generator = torch.Generator().manual_seed(0)
    ge = GrowEfficient(model, x, target=0.5, epochs=10, seed=0.5)
    ge.resize()
    seconds = []
    for _ in range(job["repeats"]):
        with torch.no_grad():
            for gate in ge.gates().values():  # some units turn off, some of the reserve on
                gate.weight.add_(0.5 * torch.randn(gate.weight.shape, generator=generator))
        start = time.process_time()
        ge.resize()
        seconds.append(time.process_time() - start)
    return {"model": job["model"], "median_s": statistics.median(seconds), "min_s": min(seconds),
            "units": sum(g.weight.numel() for g in ge.gates().values())}


WORKERS = {"train": train_worker, "widths": widths_worker, "overhead": overhead_worker, "resize": resize_worker}


def run_job(job: dict, in_process: bool) -> dict:
    """``job`` in a fresh subprocess (or, ``in_process``, here); its JSON result."""
    if in_process:
        return WORKERS[job["kind"]](job)
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise RuntimeError(f"{job['kind']} job {job} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the benchmark


def run_all(args: argparse.Namespace, folder: Path, log=print) -> dict:
    """Every training run, then the width, overhead and resize measurements."""
    base = {"epochs": args.epochs, "width": args.width, "depth": args.depth, "round_to": args.round_to,
            "data_path": args.data_path, "repeats": args.repeats}
    rows = []
    for seed in range(args.seeds):
        for method in METHODS:
            save = str(folder / f"{method}-{seed}.fxp") if method != "dense" else None  # dense: the model itself
            row = run_job({**base, "kind": "train", "method": method, "seed": seed, "save": save}, args.in_process)
            rows.append(row)
            log(f"{method} seed {seed}: accuracy {row['accuracy']:.2%}, {row['wall_s']:.1f} s wall, "
                f"{row['cpu_s']:.1f} s CPU, FLOPs {row['flops'] / 1e6:.1f}M")
    for row in rows:
        dense = next(r for r in rows if r["method"] == "dense" and r["seed"] == row["seed"])
        row.update({f"{k}_ratio": row[k] / dense[k] for k in ("flops", "params", "train_flops", "wall_s", "cpu_s",
                                                               "peak_mib")})
        row["points"] = 100 * (row["accuracy"] - dense["accuracy"])
    finals = {m: str(folder / f"{m}-0.fxp") for m in METHODS if m != "dense"}
    widths = run_job({**base, "kind": "widths", "models": finals}, args.in_process)
    overhead = run_job({**base, "kind": "overhead"}, args.in_process)
    resizes = [run_job({**base, "kind": "resize", "model": name}, args.in_process) for name in args.resize_models]
    return {"rows": rows, "widths": widths, "overhead": overhead, "resizes": resizes}


def methods_table(summary: list[dict]) -> str:
    rows = [[s["method"], pm(s, "accuracy", 100, 2), f"{s['points']:+.2f}", pm(s, "flops_ratio"),
             pm(s, "train_flops_ratio"), pm(s, "wall_s_ratio", digits=2), pm(s, "cpu_s_ratio", digits=2),
             f"{s['wall_s']:.0f}", f"{s['peak_mib']:.0f}", pm(s, "peak_mib_ratio", digits=2),
             f"{s['resize_s']:.1f} / {s['resizes']:.0f}" if s["resizes"] else ""] for s in summary]
    headers = ["method", "test accuracy %", "vs dense (points)", "inference FLOPs / dense", "training FLOPs / dense",
               "wall-clock / dense", "CPU time / dense", "wall s", "peak MiB", "peak / dense", "resizing s / resizes"]
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def runs_table(rows: list[dict]) -> str:
    body = [[r["method"], r["seed"], f"{100 * r['accuracy']:.2f}", f"{r['flops_ratio']:.3f}",
             f"{r['train_flops_ratio']:.3f}", f"{r['wall_s']:.1f}", f"{r['wall_s_ratio']:.2f}", f"{r['cpu_s']:.1f}",
             f"{r['cpu_s_ratio']:.2f}", f"{r['step_ms']:.0f}", f"{r['peak_mib']:.0f}"] for r in rows]
    headers = ["method", "seed", "test accuracy %", "FLOPs / dense", "training FLOPs / dense", "wall s",
               "wall / dense", "CPU s", "CPU / dense", "median step ms", "peak MiB"]
    return tabulate(body, headers, tablefmt="github", disable_numparse=True)


def widths_table(widths: dict) -> str:
    names = list(widths["flops"])
    rows = [[name, f"{widths['flops'][name]:.3f}",
             *[f"{widths[layout][name]['ms']:.0f} ms ({widths[layout][name]['ratio']:.2f})"
               for layout in ("contiguous", "channels_last")]] for name in names]
    headers = ["plain model of the seed-0 architecture", "FLOPs / dense", "step, default layout (/ dense)",
               "step, channels-last (/ dense)"]
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def targets(summary: list[dict], overhead: dict, resizes: list[dict]) -> list[str]:
    by = {s["method"]: s for s in summary}
    lines = []
    for method, (points, flops, wall) in TARGETS.items():
        s = by[method]
        lines.append(
            f"- {method}: <= {flops:.0%} inference FLOPs ({s['flops_ratio']:.3f}: {_verdict(s['flops_ratio'] <= flops)}), "
            f"within {points:g} point of dense ({s['points']:+.2f}: {_verdict(s['points'] >= -points)}), wall-clock "
            f"<= {wall:g}x dense ({s['wall_s_ratio']:.2f}x: {_verdict(s['wall_s_ratio'] <= wall)}; CPU time "
            f"{s['cpu_s_ratio']:.2f}x)")
    lines.append(f"- a GrowEfficient step <= {OVERHEAD_TARGET:g}x a plain step of the same physical model: "
                 f"{overhead['ratio']:.3f}x ({overhead['gated_ms']:.0f} ms against {overhead['plain_ms']:.0f} ms; "
                 f"{_verdict(overhead['ratio'] <= OVERHEAD_TARGET)})")
    name, limit = RESIZE_TARGET
    for r in resizes:
        verdict = f": {_verdict(r['median_s'] <= limit)} (target <= {limit:g} s)" if r["model"] == name else ""
        lines.append(f"- a resize of {r['model']}: {r['median_s']:.3f} s per call (median; fastest "
                     f"{r['min_s']:.3f} s){verdict}")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    """Test accuracy against training wall-clock, as a fraction of dense's: a dot per run, the
    mean with a standard-deviation bar per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    for i, s in enumerate(summarize(rows)):
        runs = [r for r in rows if r["method"] == s["method"]]
        ax.scatter([r["wall_s_ratio"] for r in runs], [100 * r["accuracy"] for r in runs], s=14, color=f"C{i}",
                   alpha=0.4)
        ax.errorbar(s["wall_s_ratio"], 100 * s["accuracy"], xerr=s["wall_s_ratio_std"], yerr=100 * s["accuracy_std"],
                    fmt="o", color=f"C{i}", capsize=3, label=f"{s['method']} ({s['flops_ratio']:.2f} FLOPs)")
    ax.set(xlabel="training wall-clock / dense", ylabel="test accuracy %", xlim=(0, None))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("CIFAR ResNet: accuracy against training time")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def section(args: argparse.Namespace, result: dict, load, minutes: float) -> str:
    end = load_average()
    loads = [f"load average (1 / 5 / 15 min) {' / '.join(f'{v:.1f}' for v in load)} at the start, "
             f"{' / '.join(f'{v:.1f}' for v in end)} at the end"] if load and end else []
    summary = summarize(result["rows"])
    description = __doc__.split("\n\n")[1:-1]
    data = f"CIFAR-10 from {args.data_path}" if args.data_path else "digits at 32 x 32"
    return "\n".join([
        SECTION, "",
        f"Command: `{command(__file__)}`", "",
        f"Machine: {machine(['no GPU'], ' (1 thread)', loads)}; {datetime.date.today().isoformat()}, whole run "
        f"{minutes:.1f} min.", "",
        f"Code: {code_version()}.", "",
        *[line for paragraph in description for line in (paragraph, "")],
        f"This run: ResNet-{args.depth}, width {args.width}, {data}, {args.epochs} epochs, seeds "
        f"0-{args.seeds - 1}, channel counts rounded to {args.round_to}.", "",
        "Mean ± standard deviation over the seeds:", "",
        methods_table(summary), "",
        "Every run:", "",
        runs_table(result["rows"]), "",
        f"![accuracy against training time]({os.path.relpath(args.plot, args.doc.parent)})", "",
        "How this CPU's step time follows width (plain models of the seed-0 architectures, freshly initialised):", "",
        widths_table(result["widths"]), "",
        "Project targets (means over the seeds):", "",
        *targets(summary, result["overhead"], result["resizes"]), "",
        "The test set is small: one digits test image is 0.28 point.", "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n")[-1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. SEEDS-1 (default 3)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--width", type=int, default=32, help="channels of the first stage (default 32)")
    parser.add_argument("--depth", type=int, default=20, help="6n + 2 layers (default 20)")
    parser.add_argument("--round-to", type=int, default=16,
                        help="channel multiple of the final models (default 16: an AVX-512 CPU's float block)")
    parser.add_argument("--data-path", default=None, help="CIFAR-10's python batches instead of digits")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps and resizes per measurement")
    parser.add_argument("--resize-models", nargs="*", default=["cifar_resnet", "resnet50"],
                        choices=["cifar_resnet", "resnet50"])
    parser.add_argument("--in-process", action="store_true", help="run every job here (no subprocesses)")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--plot", type=Path, default=PLOT)
    parser.add_argument("--json", type=Path, default=None, help="also save the results here")
    parser.add_argument("--no-doc", action="store_true", help="print the tables only; write no file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(WORKERS[job["kind"]](job)))
        return 0
    for name in ("seeds", "epochs", "width", "repeats", "round_to"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.depth < 8 or (args.depth - 2) % 6:
        parser.error("--depth must be 6n + 2 (8, 14, 20, 32, ...)")

    load, start = load_average(), time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        result = run_all(args, Path(folder))
    minutes = (time.perf_counter() - start) / 60
    summary = summarize(result["rows"])
    print("\n" + methods_table(summary) + "\n\n" + widths_table(result["widths"]) + "\n")
    print("\n".join(targets(summary, result["overhead"], result["resizes"])))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if not args.no_doc:
        plot(result["rows"], args.plot)
        write_section(args.doc, SECTION, section(args, result, load, minutes))
        print(f"wrote {args.doc} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
