#!/usr/bin/env python
"""Latency of compact models against their dense originals, next to their FLOPs.

Models: torchvision resnet50, mobilenet_v2 and vgg11_bn (``weights=None``, input
BATCHx3xRxR, R = --resolution) and the character LSTM of examples/char_lstm.py (embedding 64,
two LSTM layers of 256 units, vocabulary 103, input BATCHx100 tokens), all untrained.

For each FLOPs target (a fraction of the dense model's FLOPs, ``fxprune.cost`` at batch 1), with
and without ``round_to=8``, the keep fraction of ``fxprune.cli.magnitude_masks`` (the same
fraction of every prunable group, by weight L1 norm) is bisected until the compact model's FLOPs
are within 1% of the target (at most 10 steps; the closest is kept). Each backend then times the
dense model and all its compact variants in alternation (warm-up runs, then the median of
--repeats rounds), so load from other processes affects them alike and every latency ratio
(compact / dense) comes from one run. "gap" is latency ratio minus FLOPs ratio: how much less the
compact model gains in time than in FLOPs.

Clock: on the CPU backends, by default the CPU seconds of the process (``time.process_time``)
with one thread: on a shared machine a wall-clock median moves with other processes' load (the
same resnet50 pair was seen at 0.54 and 0.71 in consecutive runs), CPU time much less. With
several threads, or on a quiet machine, use ``--clock wall``; the wall-clock ratio is reported
too. GPU backends are always timed by the wall clock (each call ends with a synchronisation).

Backends: torch eager (CPU), ONNX Runtime CPU (``fxprune.export.to_onnx``, BatchNorm folded,
static batch), and where CUDA is available torch fp16 replayed as a CUDA graph and, where
``tensorrt`` imports, a TensorRT fp16 engine (``fxprune.export.to_tensorrt``).

    python benchmarks/latency.py                      # writes its section of docs/benchmarks.md and the plot
    python benchmarks/latency.py --models resnet50 --targets 0.5 --no-doc
    python benchmarks/latency.py --quick --no-doc     # a small residual CNN, seconds
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch import nn
from tqdm import tqdm

import fxprune
from fxprune.cli import magnitude_masks, unit_scores
from fxprune.zoo import torchvision_models

from report import ROOT, code_version, command, load_average, machine, write_section

sys.path.insert(0, str(ROOT / "examples"))
from char_lstm import CharLSTM  # noqa: E402  examples/char_lstm.py
from demo import build_model as small_resnet  # noqa: E402  examples/demo.py

SECTION = "## Latency: compact against dense"
DOC, PLOT = ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "latency.png"
MODELS = ["resnet50", "mobilenet_v2", "vgg11_bn", "char_lstm"]
TARGETS = [0.25, 0.5, 0.75]
ROUND_TOS = [None, 8]
TOKENS, VOCAB = 100, 103
TOLERANCE, STEPS = 0.01, 10  # bisection: |FLOPs ratio - target| to stop at, most steps
CHECK = ("resnet50", "onnxruntime", 0.5, 0.575)  # model, backend, FLOPs target, largest latency ratio

ORT_NOTE = ("ONNX Runtime's default optimisation level (ORT_ENABLE_ALL) runs convolutions in its blocked NCHWc "
            "layout where channel counts are multiples of its vector width (8 with AVX2, 16 with AVX-512) and "
            "falls back to slower kernels elsewhere, so channel counts that round_to=8 leaves at multiples of 8 "
            "can matter more than FLOPs; in a separate check with ORT_ENABLE_EXTENDED (no NCHWc layout), the "
            "compact resnet50 and mobilenet_v2 at 50% FLOPs ran at about the same latency ratio with and without "
            "rounding.")
Runner = Callable[[], Any]
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
GPU_BACKENDS = ("cuda-graph-fp16", "tensorrt-fp16")  # timed by the wall clock whatever --clock says
FILES = itertools.count()  # names of exported files in the run's temporary folder


def build(name: str, batch: int = 1, resolution: int = 224) -> tuple[nn.Module, torch.Tensor]:
    """Model ``name`` in eval mode (seeded) and a random input batch."""
    torch.manual_seed(0)
    if name == "char_lstm":
        return CharLSTM(VOCAB, 64, 256, 2).eval(), torch.randint(0, VOCAB, (batch, TOKENS))
    if name == "small_resnet":  # examples/demo.py's residual CNN, for --quick
        return small_resnet(2, in_channels=3, width=64, blocks=2).eval(), torch.randn(batch, 3, resolution, resolution)
    return getattr(torchvision_models(), name)().eval(), torch.randn(batch, 3, resolution, resolution)


# --------------------------------------------------------------------------- compact variants


@dataclass
class Variant:
    """A compact model whose FLOPs were searched to land near ``target`` of the dense model's."""

    target: float
    round_to: int | None
    keep: float
    flops_ratio: float
    model: nn.Module

    def __str__(self) -> str:
        return f"{self.target:.0%} FLOPs, round_to={self.round_to or '-'}"


def search(model: nn.Module, x: torch.Tensor, target: float, round_to: int | None,
           analysis: fxprune.Analysis | None = None) -> Variant:
    """Bisect the keep fraction of magnitude masks until the compact model's FLOPs ratio is within
    TOLERANCE of ``target`` (at most STEPS compactions); the variant closest to the target."""
    x1 = x[:1]
    analysis = analysis or fxprune.analyze(model, x1)
    scores = unit_scores(analysis)
    dense = fxprune.cost(model, x1).flops
    low, high, keep, best = 0.0, 1.0, math.sqrt(target), None  # conv FLOPs fall about as keep squared
    for _ in range(STEPS):
        small = fxprune.compact(model, magnitude_masks(analysis, keep, scores), x1, analysis=analysis,
                                round_to=round_to, scores=scores).eval()
        ratio = fxprune.cost(small, x1).flops / dense
        if best is None or abs(ratio - target) < abs(best.flops_ratio - target):
            best = Variant(target, round_to, keep, ratio, small)
        if abs(ratio - target) <= TOLERANCE:
            break
        low, high = (keep, high) if ratio < target else (low, keep)
        keep = (low + high) / 2
    return best


# --------------------------------------------------------------------------- backends


def eager(model: nn.Module, x: torch.Tensor, workdir: Path, threads: int) -> Runner:
    """torch eager on the CPU."""
    model.eval()
    return lambda: model(x)


def onnxruntime(model: nn.Module, x: torch.Tensor, workdir: Path, threads: int) -> Runner:
    """ONNX Runtime's CPU provider on the file ``fxprune.export.to_onnx`` writes (checked there)."""
    import onnxruntime as ort

    from fxprune.export import to_onnx

    path = to_onnx(model, x, workdir / f"{next(FILES)}.onnx", dynamic_batch=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def cuda_graph_fp16(model: nn.Module, x: torch.Tensor, workdir: Path, threads: int) -> Runner:
    """A copy of ``model`` in fp16 on the GPU, captured once as a CUDA graph and replayed."""
    gpu = copy.deepcopy(model).cuda().half().eval()
    static = (x.half() if x.is_floating_point() else x).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
        for _ in range(3):
            gpu(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        gpu(static)

    def run() -> None:
        graph.replay()
        torch.cuda.synchronize()
    return run


def tensorrt_fp16(model: nn.Module, x: torch.Tensor, workdir: Path, threads: int) -> Runner:
    """A TensorRT fp16 engine built by ``fxprune.export.to_tensorrt``."""
    from fxprune.export import TensorRTModule, to_tensorrt

    engine = TensorRTModule(to_tensorrt(model, x, workdir / f"{next(FILES)}.engine", fp16=True))
    static = x.cuda()

    def run() -> None:
        engine(static)
        torch.cuda.synchronize()
    return run


BACKENDS: dict[str, Callable[[nn.Module, torch.Tensor, Path, int], Runner]] = {
    "eager": eager, "onnxruntime": onnxruntime, "cuda-graph-fp16": cuda_graph_fp16, "tensorrt-fp16": tensorrt_fp16,
}


def available_backends() -> list[str]:
    """The CPU backends, and the GPU ones where CUDA (and for TensorRT, ``tensorrt``) is there."""
    names = ["eager", "onnxruntime"]
    if torch.cuda.is_available():
        names.append("cuda-graph-fp16")
        if importlib.util.find_spec("tensorrt") is not None:
            names.append("tensorrt-fp16")
    return names


# --------------------------------------------------------------------------- benchmark


def prepare(backend: str, model: nn.Module, x: torch.Tensor, workdir: Path, threads: int, what: str,
            log: Callable[[str], None]) -> Runner | None:
    """``backend``'s runner of ``model``, or None, logged as ``what``, where it cannot take it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the ONNX exporter's notes on its trace; to_onnx checks the result
            return BACKENDS[backend](model, x, workdir, threads)
    except Exception as e:  # noqa: BLE001  one configuration's failure must not end a long run
        log(f"{what}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
        return None


@torch.no_grad()
def medians(runners: list[Runner], repeats: int, warmup: int) -> list[dict[str, float]]:
    """Median seconds per call of each runner, by each of CLOCKS. After ``warmup`` calls of each,
    the runners are called in alternation, ``repeats`` rounds, so that load from other processes
    affects them alike (as ``latencies`` of examples/common.py does, on the wall clock only)."""
    for run in runners:
        for _ in range(warmup):
            run()
    times = [{clock: [] for clock in CLOCKS} for _ in runners]
    for _ in range(repeats):
        for run, spent in zip(runners, times):
            start = {clock: read() for clock, read in CLOCKS.items()}
            run()
            for clock, read in CLOCKS.items():
                spent[clock].append(read() - start[clock])
    return [{clock: statistics.median(t) for clock, t in spent.items()} for spent in times]


def benchmark(names: list[str], targets: list[float], round_tos: list[int | None], backends: list[str],
              repeats: int = 20, warmup: int = 3, batch: int = 1, resolution: int = 224, threads: int = 1,
              clock: str = "cpu", log: Callable[[str], None] = print) -> list[dict]:
    """One row per model, backend, round_to and target: FLOPs ratio, dense and compact latency
    (by ``clock`` on the CPU backends, by the wall clock on the GPU ones), their ratio, the gap, and
    the wall-clock ratio. A model or variant that a backend cannot take is logged and left out (with
    the dense model, the whole backend)."""
    torch.set_num_threads(threads)
    rows = []
    steps = len(names) * (len(targets) * len(round_tos) + len(backends))
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=steps, desc="latency", unit="step") as bar:
        for name in names:
            model, x = build(name, batch, resolution)
            analysis = fxprune.analyze(model, x[:1])
            variants = []
            for round_to in round_tos:
                for target in targets:
                    bar.set_postfix_str(f"{name}: search {target:.0%} FLOPs, round_to={round_to}")
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # kept channels are counted in the FLOPs anyway
                        variants.append(search(model, x, target, round_to, analysis))
                    bar.update()
            for backend in backends:
                bar.set_postfix_str(f"{name}: {backend}")
                runners = [prepare(backend, m, x, Path(tmp), threads, f"{name} / {backend} / {what}", log)
                           for what, m in [("dense", model), *((str(v), v.model) for v in variants)]]
                if runners[0] is not None:
                    measured = [(v, r) for v, r in zip(variants, runners[1:]) if r is not None]
                    dense, *compact = medians([runners[0]] + [r for _, r in measured], repeats, warmup)
                    used = "wall" if backend in GPU_BACKENDS else clock
                    for (v, _), seconds in zip(measured, compact):
                        ratio = seconds[used] / dense[used]
                        rows.append({"model": name, "input": "x".join(map(str, x.shape)), "backend": backend,
                                     "round_to": v.round_to, "target": v.target, "keep": v.keep,
                                     "flops_ratio": v.flops_ratio, "clock": used, "dense_ms": dense[used] * 1e3,
                                     "compact_ms": seconds[used] * 1e3, "latency_ratio": ratio,
                                     "gap": ratio - v.flops_ratio, "wall_ratio": seconds["wall"] / dense["wall"]})
                bar.update()
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a GitHub-markdown table."""
    head = ["model", "input", "backend", "round_to", "FLOPs target", "keep", "FLOPs ratio", "clock", "dense ms",
            "compact ms", "latency ratio", "gap", "wall-clock ratio"]
    body = [[r["model"], r["input"], r["backend"], r["round_to"] or "-", f"{r['target']:.2f}", f"{r['keep']:.3f}",
             f"{r['flops_ratio']:.3f}", r["clock"], f"{r['dense_ms']:.2f}", f"{r['compact_ms']:.2f}",
             f"{r['latency_ratio']:.3f}", f"{r['gap']:+.3f}", f"{r['wall_ratio']:.3f}"] for r in rows]
    return tabulate(body, head, tablefmt="github", disable_numparse=True)


def mean_gaps(rows: list[dict]) -> list[str]:
    """Per backend, the mean gap over models and targets, without and with rounding."""
    lines = []
    for backend in dict.fromkeys(r["backend"] for r in rows):
        gaps = {round_to: [r["gap"] for r in rows if (r["backend"], r["round_to"]) == (backend, round_to)]
                for round_to in ROUND_TOS}
        lines.append(f"- {backend}: " + ", ".join(f"round_to={round_to or '-'} {statistics.mean(g):+.3f}"
                                                 for round_to, g in gaps.items() if g))
    return lines


def check(rows: list[dict]) -> list[str]:
    """The project target on the resnet50 / onnxruntime / 50% rows: met or missed, per round_to."""
    model, backend, target, limit = CHECK
    found = [r for r in rows if (r["model"], r["backend"], r["target"]) == (model, backend, target)]
    head = f"{model} compacted to {target:.0%} of its FLOPs runs at <= {limit}x the dense latency on {backend}"
    if not found:
        return [f"- {head}: not measured in this run."]
    return [f"- {head} (round_to={r['round_to'] or '-'}): {'met' if r['latency_ratio'] <= limit else 'MISSED'} "
            f"(FLOPs ratio {r['flops_ratio']:.3f}, latency ratio {r['latency_ratio']:.3f})" for r in found]


def plot(rows: list[dict], path: Path) -> None:
    """Latency ratio against FLOPs ratio: a marker per backend, a colour per model, hollow for
    round_to=8, and the line y = x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    markers = dict(zip(BACKENDS, "osD^"))
    models = list(dict.fromkeys(r["model"] for r in rows))
    colours = {m: f"C{i}" for i, m in enumerate(models)}
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot([0, 1.05], [0, 1.05], ":", color="grey")
    for r in rows:
        colour = colours[r["model"]]
        ax.scatter(r["flops_ratio"], r["latency_ratio"], marker=markers[r["backend"]], s=45, edgecolors=colour,
                   facecolors="none" if r["round_to"] else colour)
    handles = [Line2D([], [], ls=":", color="grey", label="latency ratio = FLOPs ratio")]
    handles += [Line2D([], [], ls="", marker=markers[b], color="black", label=b)
                for b in dict.fromkeys(r["backend"] for r in rows)]
    handles += [Line2D([], [], ls="", marker="o", color=colours[m], label=m) for m in models]
    handles += [Line2D([], [], ls="", marker="o", markerfacecolor="none", color="black", label="round_to=8")]
    ax.legend(handles=handles, fontsize=8, loc="upper left")
    top = max([1.05] + [r["latency_ratio"] * 1.05 for r in rows])
    ax.set(xlim=(0, 1.05), ylim=(0, top), xlabel="FLOPs ratio (compact / dense)",
           ylabel="latency ratio (compact / dense)", title="compact models: latency against FLOPs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def section(args: argparse.Namespace, rows: list[dict], skipped: list[str], load: tuple | None,
            minutes: float) -> str:
    """The markdown section for docs/benchmarks.md."""
    import onnxruntime as ort

    gpu = [f"GPU {torch.cuda.get_device_name()}"] if torch.cuda.is_available() else ["no GPU"]
    end = load_average()
    loads = [f"load average (1 / 5 / 15 min) {' / '.join(f'{v:.1f}' for v in load)} at the start, "
             f"{' / '.join(f'{v:.1f}' for v in end)} at the end"] if load and end else []
    threads = f" ({args.threads} thread{'s' * (args.threads > 1)}: torch.set_num_threads, ORT intra_op_num_threads)"
    method = __doc__.split("\n\n")[1:-1]
    cnn_input = f"{args.batch}x3x{args.resolution}x{args.resolution}"
    return "\n".join([
        SECTION, "",
        f"Command: `{command(__file__)}`", "",
        f"Machine: {machine([f'onnxruntime {ort.__version__}', *gpu], threads, loads)}; "
        f"{datetime.date.today().isoformat()}, whole run {minutes:.1f} min.", "",
        f"Code: {code_version()}.", "",
        *[line for paragraph in method for line in (paragraph, "")],
        f"This run: CNN input {cnn_input}, LSTM input {args.batch}x{TOKENS} tokens; {args.warmup} warm-up "
        f"call{'s' * (args.warmup != 1)} of each model, then the median of {args.repeats} rounds; CPU backends "
        f"timed by the {args.clock} clock.", "",
        table(rows), "",
        *([f"Not measured: {'; '.join(skipped)}.", ""] if skipped else []),
        "Mean gap (latency ratio - FLOPs ratio) over models and targets:", "", *mean_gaps(rows), "",
        *([ORT_NOTE, ""] if any(r["backend"] == "onnxruntime" for r in rows) else []),
        f"![latency ratio against FLOPs ratio]({os.path.relpath(args.plot, args.doc.parent)})", "",
        "Project target:", "", *check(rows), "",
    ])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table and, unless --no-doc, write the doc section and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n")[-1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(MODELS)}")
    parser.add_argument("--targets", nargs="+", type=float, default=TARGETS, help="fractions of dense FLOPs")
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=None,
                        help=f"default: those available here ({', '.join(available_backends())})")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds; the median is reported")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs of each model first")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=224, help="image side of the CNN inputs")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of torch and ONNX Runtime")
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu",
                        help="how CPU backends are timed: CPU seconds of the process (default; with one thread) "
                             "or wall-clock seconds")
    parser.add_argument("--quick", action="store_true",
                        help="examples/demo.py's small residual CNN at 32x32, 3 repeats, 1 warm-up run")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--plot", type=Path, default=PLOT)
    parser.add_argument("--no-doc", action="store_true", help="print the table only; write no file")
    parser.add_argument("--json", type=Path, default=None, help="also save the rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.resolution = 3, 1, 32
    names = args.models or (["small_resnet"] if args.quick else MODELS)

    load, start, skipped = load_average(), datetime.datetime.now(), []

    def log(message: str) -> None:
        tqdm.write(f"not measured: {message}", file=sys.stderr)
        skipped.append(message)

    rows = benchmark(names, args.targets, ROUND_TOS, args.backends or available_backends(), args.repeats,
                     args.warmup, args.batch, args.resolution, args.threads, args.clock, log)
    minutes = (datetime.datetime.now() - start).total_seconds() / 60
    print(table(rows))
    print("\n".join(["", *check(rows)]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if not args.no_doc:
        plot(rows, args.plot)
        write_section(args.doc, SECTION, section(args, rows, skipped, load, minutes))
        print(f"wrote {args.doc} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
