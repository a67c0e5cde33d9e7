#!/usr/bin/env python
"""Time and memory of ``fxprune.analyze`` + ``fxprune.compact``, side by side with Torch-Pruning.

Every model has ~30% of the channels of each prunable fxprune group removed (lowest L1 filter
magnitude, or random with a fixed seed). Torch-Pruning (if importable) removes exactly the same
channels: for each fxprune group, one producing layer is the root of
``DG.get_pruning_group(layer, prune_out_channels, idxs)`` and ``group.prune()`` follows the
coupling to the rest of the group. The two pruned models' parameter shapes and outputs on the
example input are compared, which checks that both removed the same channels (outputs differ where
``compact`` folds a removed channel's constant into a consumer's bias and Torch-Pruning drops it).

Models: torchvision resnet50, mobilenet_v2, densenet121, vit_b_16 (weights=None, 1x3x224x224) and a
synthetic residual network of N blocks (16 channels, 1x16x8x8) for N in --blocks, to show how time
grows with the number of graph nodes.

A third measurement per torchvision model ("resize", skipped with --no-resize) times what a training
method's periodic resize needs: ``compact``, then ``grow`` of some groups of the result, each
followed by the analysis of its result, computed afresh (``analyze``) or derived
(``return_analysis=True``).

Method
------
Each (model, tool) pair runs in its own fresh subprocess:

1. build the model (``torch.manual_seed(0)``, so both tools see the same weights) and choose the
   channels to remove (this runs ``fxprune.analyze`` once, untimed);
2. one full untimed warm-up run of the tool on the model (loads lazy imports, fills caches);
3. ``gc.collect()`` and glibc ``malloc_trim(0)``, read the resident set size (RSS) as the
   baseline, reset the kernel's RSS high-water mark (``echo 5 > /proc/self/clear_refs``), run the
   tool once, and read ``VmHWM`` from ``/proc/self/status``: peak memory = VmHWM - baseline. This
   counts every allocation of the process (Python objects, torch's CPU allocator, malloc), not
   only Python's. Where clear_refs is unavailable a 1 ms RSS-sampling thread is used instead;
4. more runs, for timing, until ``--repeats`` runs are done or ``--budget`` seconds have been
   spent; the table shows the best (minimum) run, the estimate least disturbed by other load.

Times are CPU seconds of the measuring process (``time.process_time``) with one torch thread by
default (``--clock wall`` shows wall-clock seconds; ``--threads`` sets the torch threads): on a
shared machine whose other work comes and goes, wall-clock times of the same run vary several-fold,
CPU time much less. Both clocks are kept in the ``--json`` output.

Torch-Pruning prunes its model in place, so every run gets a ``copy.deepcopy`` made before the
baseline and the timer; ``fxprune.compact`` never mutates its input and returns a new model, whose
memory is part of its peak.

The memory reference is parameter (and buffer) bytes plus one forward pass's activations: the
bytes of every node output of the traced graph (the model input included, in-place ops not
counted twice), i.e. what a forward pass with autograd keeps alive at batch size 1.

Usage::

    python benchmarks/compact_speed.py            # full run, writes docs/benchmarks.md + PNG
    python benchmarks/compact_speed.py --quick    # resnet18 + 50-block synthetic only
    python benchmarks/compact_speed.py --profile  # cProfile fxprune on resnet50 and 500 blocks

Torch-Pruning is a benchmark-only dependency: ``pip install --no-deps torch-pruning==1.6.1``.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from report import code_version, command, load_average
from report import machine as machine_parts
from report import write_section

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "compact_speed.png"
SECTION = "## analyze + compact speed"
TV_MODELS = ["resnet50", "mobilenet_v2", "densenet121", "vit_b_16"]
BLOCKS = [50, 100, 200, 500]
TP_VERSION = "1.6.1"
LOAD_AT_START: tuple[float, float, float] | None = None
LINEAR_SLOPE = 1.10  # log-log slope of time vs node count accepted as linear growth
RESIZE_BUDGET = 0.15  # seconds for GrowEfficient's resize of resnet50
GROW_EFFICIENT_MODELS = ("resnet50",)
TP_INSTALL = f"pip install --no-deps torch-pruning=={TP_VERSION}"


# --------------------------------------------------------------------------- models

def synthetic_resnet(blocks: int, channels: int = 16):
    """Stem conv, ``blocks`` residual blocks (conv-bn-relu-conv-bn + skip, relu), pool, linear."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(x + self.bn2(self.conv2(y)))

    class SyntheticResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(channels)
            self.blocks = nn.Sequential(*[Block(channels) for _ in range(blocks)])
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(channels, 10)

        def forward(self, x):
            x = self.blocks(torch.relu(self.bn(self.stem(x))))
            return self.fc(torch.flatten(self.pool(x), 1))

    return SyntheticResNet()


def build(name: str):
    """The model called ``name`` (eval mode, seeded weights) and its example input."""
    import torch

    torch.manual_seed(0)
    if name.startswith("synthetic-"):
        model = synthetic_resnet(int(name.split("-")[1]))
        x = torch.randn(1, 16, 8, 8)
    else:
        from fxprune.zoo import torchvision_models

        model = getattr(torchvision_models(), name)(weights=None)
        x = torch.randn(1, 3, 224, 224)
    # Non-trivial BatchNorm statistics, so that a wrongly removed channel shows in the outputs.
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval(), x


# --------------------------------------------------------------------------- channel choice

def choose_masks(analysis, ratio: float, criterion: str, seed: int) -> dict:
    """Keep-masks removing ``round(ratio * size)`` channels of every prunable group that the weight of
    one of its producing layers holds (not a group of whole attention heads: Torch-Pruning starts a
    pruning group from a layer's weight).

    "l1": a unit's score is the L1 norm of its producers' output filters (summed over the
    producers of the group); the lowest-scoring units go. "random": a seeded random choice.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for g in analysis.groups:
        weights = {f"{p}.weight" for p in g.producers}
        if not g.prunable or not any(m.kind == "param" and m.name in weights for m in g.members):
            continue  # Torch-Pruning needs a producing layer's weight to start from (not attention heads)
        n_drop = min(int(round(ratio * g.size)), g.size - 1)
        if n_drop <= 0:
            continue
        score = torch.zeros(g.size, dtype=torch.float64)
        found = False
        if criterion == "l1":
            for m in g.members:
                if m.kind == "param" and m.name in weights:
                    w = analysis.gm.get_parameter(m.name).detach()
                    l1 = w.abs().movedim(m.dim, 0).reshape(w.shape[m.dim], -1).sum(1).double()
                    score.index_add_(0, m.unit, l1[m.index])
                    found = True
        if not found:
            score = torch.rand(g.size, generator=gen, dtype=torch.float64)
        drop = torch.argsort(score, stable=True)[:n_drop]
        keep = torch.ones(g.size, dtype=torch.bool)
        keep[drop] = False
        masks[g.name] = keep
    return masks


def tp_roots(analysis, masks: dict, model) -> list[tuple[str, list[int]]]:
    """For each masked group, one producing layer and its output channels to remove.

    Prefers a dense (groups == 1) conv or a linear layer as the root; the removed output channels
    are those whose unit the mask drops, read from the group's member for that layer's weight.
    """
    from torch import nn

    modules = dict(model.named_modules())
    out = []
    for g in analysis.groups:
        if g.name not in masks:
            continue
        keep = masks[g.name]
        candidates = []
        for m in g.members:
            owner = m.name[: -len(".weight")] if m.name.endswith(".weight") else None
            if m.kind != "param" or owner not in g.producers or owner not in modules:
                continue
            layer = modules[owner]
            dense = isinstance(layer, nn.Linear) or (isinstance(layer, nn.modules.conv._ConvNd) and layer.groups == 1)
            idxs = sorted(m.index[~keep[m.unit]].tolist())
            candidates.append((not dense, g.producers.index(owner), owner, idxs))
        if not candidates:
            raise RuntimeError(f"no producing layer with a weight for group {g.name!r}")
        _, _, owner, idxs = min(candidates)
        out.append((owner, idxs))
    return out


# --------------------------------------------------------------------------- measurement

_LIBC = None


def _trim() -> None:
    """Collect garbage and give freed heap memory back to the OS, for a clean RSS baseline."""
    global _LIBC
    gc.collect()
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


class PeakRSS:
    """Peak resident memory above the RSS at entry, in bytes (see the module docstring)."""

    def __enter__(self):
        _trim()
        self.base = _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.method, self._thread = "VmHWM", None
        except OSError:
            self.method, self._max, self._stop = "sampled", self.base, False
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop:
            self._max = max(self._max, _status_kb("VmRSS"))
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self._thread is None:
            peak = _status_kb("VmHWM")
        else:
            self._stop = True
            self._thread.join()
            peak = max(self._max, _status_kb("VmRSS"))
        self.peak = (peak - self.base) * 1024
        return False


def model_bytes(analysis) -> tuple[int, int]:
    """(parameter + buffer bytes, activation bytes of one forward pass) from the traced graph."""
    import torch

    gm = analysis.gm
    params = {id(t): t.numel() * t.element_size() for t in list(gm.parameters()) + list(gm.buffers())}
    act = 0
    for n in gm.graph.nodes:
        if n.op in ("output", "get_attr"):
            continue
        if n.op == "call_module" and getattr(gm.get_submodule(n.target), "inplace", False):
            continue
        if n.op == "call_method" and str(n.target).endswith("_"):
            continue
        if n.kwargs.get("inplace"):
            continue
        meta = n.meta.get("tensor_meta")
        metas = [meta] if hasattr(meta, "shape") else [m for m in meta if hasattr(m, "shape")] \
            if isinstance(meta, (list, tuple)) else []
        for m in metas:
            act += math.prod(m.shape) * torch.empty((), dtype=m.dtype).element_size()
    return sum(params.values()), act


def _clock() -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process)."""
    return time.perf_counter(), time.process_time()


def _diff(b: tuple[float, float], a: tuple[float, float]) -> tuple[float, float]:
    return b[0] - a[0], b[1] - a[1]


def worker(spec: dict) -> dict:
    """One (model, tool) measurement; runs in a fresh process."""
    import torch

    torch.set_num_threads(spec["threads"])
    import fxprune

    model, x = build(spec["model"])
    analysis = fxprune.analyze(model, x)
    masks = choose_masks(analysis, spec["ratio"], spec["criterion"], spec["seed"])
    info = {
        "nodes": len(analysis.gm.graph.nodes),
        "groups": len(analysis.groups),
        "masked": len(masks),
        "removed": int(sum((~m).sum() for m in masks.values())),
        "channels": int(sum(g.size for g in analysis.groups if g.name in masks)),
    }
    info["param_bytes"], info["act_bytes"] = model_bytes(analysis)
    if spec["tool"] == "resize":
        return {**info, **resize_times(model, x, analysis, masks, spec)}

    if spec["tool"] == "fxprune":
        del analysis

        def run(verify: bool = True):
            t0 = _clock()
            a = fxprune.analyze(model, x)
            t1 = _clock()
            small = fxprune.compact(model, masks, x, analysis=a, verify=verify)
            t2 = _clock()
            return small, (_diff(t1, t0), _diff(t2, t1))

        def prepare():
            return None
    else:
        import torch_pruning as tp

        roots = tp_roots(analysis, masks, model)
        del analysis

        def prepare():
            return copy.deepcopy(model)

        def run(m):
            t0 = _clock()
            dg = tp.DependencyGraph().build_dependency(m, example_inputs=x, verbose=False)
            t1 = _clock()
            layers = dict(m.named_modules())
            for name, idxs in roots:
                layer = layers[name]
                group = dg.get_pruning_group(layer, dg.get_pruner_of_module(layer).prune_out_channels, idxs)
                group.prune()
            t2 = _clock()
            return m, (_diff(t1, t0), _diff(t2, t1))

    call = (lambda state: run()) if spec["tool"] == "fxprune" else run
    pruned, _ = call(prepare())  # warm-up, untimed
    with torch.no_grad():
        out = pruned(x).flatten()
    info["params_after"] = sum(p.numel() for p in pruned.parameters())
    info["shapes"] = {k: list(v.shape) for k, v in pruned.named_parameters()}
    report = getattr(pruned, "meta", {}).get("fxprune_report", [])
    info["folded"] = sum(1 for r in report if getattr(r, "action", None) == "folded")
    info["out"] = out.tolist()
    del pruned, out

    state = prepare()
    with PeakRSS() as peak:
        pruned, t = call(state)
    info["peak_bytes"], info["peak_method"] = peak.peak, peak.method
    times, unverified = [t], []
    del pruned, state
    start = time.perf_counter()
    while len(times) < spec["repeats"] and time.perf_counter() - start < spec["budget"]:
        state = prepare()
        pruned, t = call(state)
        times.append(t)
        del pruned, state
        if spec["tool"] == "fxprune":  # the same run without compact's final check, in the same conditions
            pruned, t = run(verify=False)
            unverified.append(t)
            del pruned
    for i, clock in enumerate(("wall", "cpu")):
        info[f"{clock}_first"] = [a[i] for a, _ in times]
        info[f"{clock}_second"] = [b[i] for _, b in times]
    info["t_first"], info["t_second"] = info[f"{spec['clock']}_first"], info[f"{spec['clock']}_second"]
    if spec["tool"] == "fxprune":
        clock = 0 if spec["clock"] == "wall" else 1
        info["t_unverified"] = [a[clock] + b[clock] for a, b in unverified] or [float("nan")]
    return info


def resize_times(model, x, analysis, masks: dict, spec: dict) -> dict:
    """CPU (or wall) seconds of the steps of a resize, the best of the repeats: compact, then grow
    every fourth group of the compact model that has two channels or more by a tenth of its size
    (at least one), each followed by the analysis of its result, computed afresh (``analyze``) or
    derived (``return_analysis=True``)."""
    import fxprune

    clock = 0 if spec["clock"] == "wall" else 1
    steps = {k: [] for k in ("compact", "analyze compact", "compact derived", "grow", "analyze grown", "grow derived")}

    def timed(key: str, fn, *args, **kwargs):
        t0 = _clock()
        out = fn(*args, **kwargs)
        steps[key].append(_diff(_clock(), t0)[clock])
        return out

    start = time.perf_counter()
    for i in range(spec["repeats"] + 1):  # the first round warms up
        small = timed("compact", fxprune.compact, model, masks, x, analysis)
        fresh = timed("analyze compact", fxprune.analyze, small, x)
        small, derived = timed("compact derived", fxprune.compact, model, masks, x, analysis, return_analysis=True)
        growable = [g for g in derived.groups if g.prunable and g.size >= 2][::4]
        widen = {g.name: max(1, g.size // 10) for g in growable}
        big, _ = timed("grow", fxprune.grow, small, x, widen=widen, analysis=derived)
        grown_fresh = timed("analyze grown", fxprune.analyze, big, x)
        big, _, grown = timed("grow derived", fxprune.grow, small, x, widen=widen, analysis=derived, return_analysis=True)
        same = [(g.name, g.size) for g in fresh.groups] == [(g.name, g.size) for g in derived.groups] and \
            [(g.name, g.size) for g in grown_fresh.groups] == [(g.name, g.size) for g in grown.groups]
        used = derived.gm is small and grown.gm is big  # derived, not analysed afresh
        del small, big, fresh, derived, grown, grown_fresh
        if i == 0:
            steps = {k: [] for k in steps}
        elif time.perf_counter() - start > spec["budget"]:
            break
    out = {"steps": steps, "widened": len(widen), "derived_used": used, "same_groups": same}
    if spec["model"] in GROW_EFFICIENT_MODELS:
        out["grow_efficient"] = grow_efficient_resize(model, x, spec)
    return out


def grow_efficient_resize(model, x, spec: dict) -> list[float]:
    """Seconds of ``GrowEfficient.resize()`` on its seed (the training method's own resize, as it
    calls compact, grow and analyze), after one untimed resize."""
    from fxprune.methods import GrowEfficient

    clock = 0 if spec["clock"] == "wall" else 1
    ge = GrowEfficient(model, x, target=0.5, metric="flops", epochs=20)
    ge.resize()
    times = []
    for _ in range(spec["repeats"]):
        t0 = _clock()
        ge.resize()
        times.append(_diff(_clock(), t0)[clock])
    return times


def run_worker(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {err}"}


# --------------------------------------------------------------------------- report

def machine() -> str:
    """The machine (see report.machine), the load during the run, and Torch-Pruning's version."""
    tail = []
    if LOAD_AT_START is not None:
        tail.append("load average (1 / 5 / 15 min) %.1f / %.1f / %.1f at the start of the run, "
                    "%.1f / %.1f / %.1f at the end" % (LOAD_AT_START + os.getloadavg()))
    tp = tp_version()
    tail.append(f"Torch-Pruning {tp}" if tp else "Torch-Pruning not installed")
    return machine_parts([], tail=tail)


def shared() -> bool:
    """Whether the machine was busy with other work (load above its core count) during the run."""
    try:
        load = max(os.getloadavg()[2], (LOAD_AT_START or (0.0,))[0])
    except OSError:
        return False
    return load > (os.cpu_count() or 1)


def tp_version() -> str | None:
    if importlib.util.find_spec("torch_pruning") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:
        return "unknown version"


def med(xs: list[float]) -> float:
    """The statistic shown for repeated timings: the best run (least disturbed by other load)."""
    return min(xs)


def mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def outputs_agree(fx: dict, tp: dict) -> str:
    """Whether both tools removed the same channels (same parameter shapes) and agree on outputs."""
    if "out" not in fx or "out" not in tp:
        return "-"
    a, b = fx.get("shapes", {}), tp.get("shapes", {})
    shapes = all(a[k] == b[k] for k in a.keys() & b.keys()) and not (b.keys() - a.keys())
    if len(fx["out"]) != len(tp["out"]):
        return "NO (output shapes differ)"
    diff = max(abs(p - q) for p, q in zip(fx["out"], tp["out"]))
    rel = diff / max(1e-12, max(abs(p) for p in fx["out"]))
    if not shapes:
        return f"NO: parameter shapes differ ({rel:.0e})"
    if rel <= 1e-4:
        return f"yes ({rel:.0e})"
    if fx.get("folded"):
        return f"same channels; outputs differ ({rel:.0e}): fxprune folded {fx['folded']} constants, TP drops them"
    return f"same shapes, outputs differ ({rel:.0e})"


def table(results: dict, names: list[str], with_tp: bool) -> tuple[list, list]:
    head = ["model", "nodes", "removed / channels", "fxprune analyze s", "fxprune compact s",
            "fxprune total s", "total, verify=False s", "fxprune peak MiB", "params + act MiB", "peak / (params + act)"]
    if with_tp:
        head += ["TP build s", "TP prune s", "TP total s", "TP peak MiB", "TP / fxprune time",
                 "same result"]
    rows = []
    for name in names:
        fx, tp = results[name].get("fxprune", {}), results[name].get("tp", {})
        if "error" in fx:
            rows.append([name] + [f"error: {fx['error']}"] + [""] * (len(head) - 2))
            continue
        a, c = med(fx["t_first"]), med(fx["t_second"])
        total = med([p + q for p, q in zip(fx["t_first"], fx["t_second"])])
        ref = fx["param_bytes"] + fx["act_bytes"]
        row = [name, fx["nodes"], f"{fx['removed']} / {fx['channels']}", f"{a:.3f}", f"{c:.3f}",
               f"{total:.3f}", f"{med(fx['t_unverified']):.3f}", mib(fx["peak_bytes"]), f"{mib(fx['param_bytes'])} + {mib(fx['act_bytes'])}",
               f"{fx['peak_bytes'] / ref:.2f}"]
        if with_tp:
            if "error" in tp:
                row += [f"error: {tp['error']}", "", "", "", "", ""]
            else:
                tt = med([p + q for p, q in zip(tp["t_first"], tp["t_second"])])
                row += [f"{med(tp['t_first']):.3f}", f"{med(tp['t_second']):.3f}", f"{tt:.3f}",
                        mib(tp["peak_bytes"]), f"{tt / total:.2f}", outputs_agree(fx, tp)]
        rows.append(row)
    return head, rows


def resize_table(results: dict, names: list[str]) -> tuple[list, list]:
    """The steps of a resize with the analyses of its results re-analysed or derived (see resize_times)."""
    head = ["model", "widened groups", "compact s", "analyze(result) s", "compact(return_analysis=True) s",
            "grow s", "analyze(grown) s", "grow(return_analysis=True) s", "resize, re-analysing s",
            "resize, deriving s", "re-analysing / deriving", "derived == fresh groups"]
    rows = []
    for name in names:
        r = results[name].get("resize")
        if not r:
            continue
        if "error" in r:
            rows.append([name, f"error: {r['error']}"] + [""] * (len(head) - 2))
            continue
        t = {k: min(v) for k, v in r["steps"].items()}
        fresh = t["compact"] + t["analyze compact"] + t["grow"] + t["analyze grown"]
        derived = t["compact derived"] + t["grow derived"]
        rows.append([name, r["widened"]] + [f"{t[k]:.3f}" for k in (
            "compact", "analyze compact", "compact derived", "grow", "analyze grown", "grow derived")]
            + [f"{fresh:.3f}", f"{derived:.3f}", f"{fresh / derived:.2f}",
               ("yes" if r["same_groups"] else "NO") + ("" if r["derived_used"] else " (analysed afresh)")])
    return head, rows


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float, float]:
    """Least-squares y = a*x + b, its R^2, and the log-log slope (1 for linear growth)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    b = my - a * mx
    ss_tot = sum((y - my) ** 2 for y in ys) or 1e-30
    r2 = 1 - sum((y - a * x - b) ** 2 for x, y in zip(xs, ys)) / ss_tot
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mlx, mly = sum(lx) / n, sum(ly) / n
    slope = sum((u - mlx) * (v - mly) for u, v in zip(lx, ly)) / sum((u - mlx) ** 2 for u in lx)
    return a, b, r2, slope


def scaling(results: dict, synth: list[str], with_tp: bool) -> tuple[list[str], dict]:
    """Lines describing growth with node count, and the series for the plot."""
    series: dict[str, tuple[list, list]] = {}
    for name in synth:
        fx, tp = results[name].get("fxprune", {}), results[name].get("tp", {})
        if "error" in fx or not fx:
            continue
        n = fx["nodes"]
        for label, v in (("fxprune analyze", med(fx["t_first"])), ("fxprune compact", med(fx["t_second"])),
                         ("fxprune total", med([p + q for p, q in zip(fx["t_first"], fx["t_second"])]))):
            series.setdefault(label, ([], []))[0].append(n)
            series[label][1].append(v)
        if with_tp and tp and "error" not in tp:
            series.setdefault("Torch-Pruning total", ([], []))[0].append(n)
            series["Torch-Pruning total"][1].append(med([p + q for p, q in zip(tp["t_first"], tp["t_second"])]))
    lines = []
    for label, (xs, ys) in series.items():
        if len(xs) < 2:
            continue
        a, b, r2, slope = linear_fit(xs, ys)
        per = [1e3 * y / x for x, y in zip(xs, ys)]
        lines.append(f"| {label} | {a * 1e3:.3f} | {r2:.4f} | {slope:.2f} | "
                     + ", ".join(f"{p:.3f}" for p in per) + " |")
    if lines:
        lines = ["| series | fit: ms per node | R² of linear fit | log-log slope (1 = linear, 2 = quadratic) | "
                 "ms per node at each N |", "|---|---|---|---|---|"] + lines
    return lines, series


def plot(series: dict, path: Path, ylabel: str = "time (s)") -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in series.items():
        style = "--" if label.startswith("Torch") else "-"
        ax.plot(xs, ys, style, marker="o", label=label)
    if "fxprune total" in series:  # what exactly linear growth from the smallest network would give
        xs, ys = series["fxprune total"]
        ax.plot(xs, [ys[0] * x / xs[0] for x in xs], ":", color="grey", label="fxprune total, linear from smallest")
    ax.set_xlabel("FX graph nodes (synthetic residual network, N blocks)")
    ax.set_ylabel(ylabel)
    ax.set_title("analyze + compact time vs graph size (best of runs)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def section(args, head, rows, scale_lines, plotted: bool, with_tp: bool, results: dict, resize: tuple) -> str:
    from tabulate import tabulate

    cmd = command(__file__)
    methods = sorted({r.get(t, {}).get("peak_method") for r in results.values() for t in ("fxprune", "tp")} - {None})
    out = [SECTION, "",
           f"Command: `{cmd}`", "",
           f"Machine: {machine()}.", "",
           f"Code: {code_version()}.", "",
           f"Each prunable fxprune group that a layer's weight produces (not attention heads) loses "
           f"{args.ratio:.0%} of its channels (rounded; "
           f"{'lowest L1 filter norm' if args.criterion == 'l1' else f'random, seed {args.seed}'}); Torch-Pruning "
           "removes the same channels through `DG.get_pruning_group(layer, prune_out_channels, idxs)` and "
           "`group.prune()`, one root layer per fxprune group. \"total, verify=False\" is the same runs with "
           "`compact(..., verify=False)`, which skips the final check that the result runs with the predicted "
           "shapes (the default keeps it). Times are "
           + ("CPU seconds of the measuring process (`time.process_time`, robust to other load on a shared "
              "machine)" if args.clock == "cpu" else "wall-clock seconds")
           + f" with {args.threads} torch thread{'s' if args.threads > 1 else ''}, the best of up to "
           f"{args.repeats} runs (at most {args.budget:.0f} s of repeats) after one warm-up run; fxprune time is "
           "`analyze` + `compact`, Torch-Pruning time is `DependencyGraph().build_dependency` + pruning all groups. "
           "Both write the pruned weights into new memory; where the allocator cannot reuse memory freed by an "
           "earlier run, the kernel maps fresh pages (about 13000 page faults for resnet50's pruned weights, "
           "20-100 ms of system time on this virtual machine, varying with the host's load), so the best run "
           "is one that reused memory. "
           "Each (model, tool) pair runs in a fresh subprocess. Peak memory is the rise of the process's "
           f"resident set during one run ({', '.join(methods) or 'VmHWM'}: the kernel's high-water mark, reset "
           "through `/proc/self/clear_refs` after `gc.collect()` and `malloc_trim(0)`), so it counts Python and "
           "torch allocations alike. It is compared with the model's parameter + buffer bytes plus one forward "
           "pass's activations (every node output of the traced graph at batch size 1). fxprune returns a new "
           "model (its copy of the parameters is part of its peak); Torch-Pruning prunes in place. "
           "\"same result\": both pruned models have the same parameter shapes and outputs within 1e-4 (relative "
           "max difference in brackets). BatchNorm statistics are randomised (weight, bias, running mean and "
           "variance), as in a trained model, so a removed channel that feeds a BatchNorm it does not directly "
           "precede (DenseNet's concatenations) leaves a constant behind: `compact` folds it into the next "
           "conv's bias (exactly equal to `apply_masks`), Torch-Pruning drops it; with default BatchNorm "
           "statistics the two outputs are identical.", ""]
    if shared():
        out += ["> Other work shared the machine during this run (see the load average above). CPU time does "
                "not count the time other processes hold a core, but it still grows when they compete for "
                "caches and memory bandwidth: between runs of this script on a shared 2-core machine the same "
                "measurement's CPU time was seen to vary by up to ~1.7x, so ratios and the fitted slope below are "
                "uncertain by tens of percent (the slope of fxprune total time by about +-0.2).", ""]
    if not with_tp:
        out += ["> Torch-Pruning columns skipped (`--no-tp`)." if args.no_tp else
                f"> Torch-Pruning is not importable, so its columns are skipped. Install it for the benchmark "
                f"only with `{TP_INSTALL}`.", ""]
    out += [tabulate(rows, head, tablefmt="github", disable_numparse=True), ""]
    if resize[1]:
        out += ["Analysis of the rewritten model, as a training method's resize needs it (GrowEfficient compacts, "
                "analyses the result, grows some groups and analyses again): `compact` and `grow` of the same "
                "model and masks, the analysis of each result computed afresh by `analyze` (it traces and "
                "propagates labels again) or derived from the analysis the rewrite started from "
                "(`return_analysis=True`). The grown groups are every fourth group of the compact model with two "
                "or more channels, each widened by a tenth of its size (at least one). Each step is the best of "
                "the repeats; \"derived == fresh groups\" compares the group names and sizes of both analyses "
                "(tests/test_derived_analysis.py checks members, layers and the models they compact to).", "",
                tabulate(resize[1], resize[0], tablefmt="github", disable_numparse=True), ""]
        ge = [(n, min(r["resize"]["grow_efficient"])) for n, r in results.items() if "grow_efficient" in r.get("resize", {})]
        out += [f"`GrowEfficient(model, x, target=0.5, epochs=20).resize()` on its seed (the method's own resize, "
                f"with the analyses it computes), best of {args.repeats} after one untimed resize: "
                + ", ".join(f"{n} {t:.3f} s" for n, t in ge) + ".", ""] if ge else []
    if scale_lines:
        out += ["Growth with graph size (synthetic residual networks):", ""] + scale_lines + [""]
    if plotted:
        out += [f"![time vs node count]({os.path.relpath(args.plot, args.doc.parent)})", ""]
    out += targets(results, args, with_tp, scale_lines)
    return "\n".join(out).rstrip() + "\n"


def targets(results: dict, args, with_tp: bool, scale_lines) -> list[str]:
    lines = ["Project targets:", ""]
    r50 = results.get("resnet50", {})
    fx, tp = r50.get("fxprune", {}), r50.get("tp", {})
    if with_tp and fx and tp and "error" not in fx and "error" not in tp:
        ratio = med([p + q for p, q in zip(tp["t_first"], tp["t_second"])]) / \
            med([p + q for p, q in zip(fx["t_first"], fx["t_second"])])
        unverified = med([p + q for p, q in zip(tp["t_first"], tp["t_second"])]) / med(fx["t_unverified"])
        lines.append(f"- fxprune >= 3x faster than Torch-Pruning on resnet50: "
                     f"{'met' if ratio >= 3 else 'MISSED'} (Torch-Pruning / fxprune = {ratio:.2f}; "
                     f"{unverified:.2f} with `compact(..., verify=False)`).")
    else:
        lines.append("- fxprune >= 3x faster than Torch-Pruning on resnet50: not measured in this run.")
    rz = r50.get("resize", {})
    if rz and "grow_efficient" in rz:
        t = min(rz["grow_efficient"])
        lines.append(f"- `GrowEfficient.resize()` of resnet50 <= {RESIZE_BUDGET} s: "
                     f"{'met' if t <= RESIZE_BUDGET else 'MISSED'} ({t:.3f} s).")
    total = [ln for ln in scale_lines if ln.startswith("| fxprune total")]
    if total:
        slope = float(total[0].split("|")[4])
        per = [float(v) for v in total[0].split("|")[5].split(",")]
        lines.append(f"- linear growth in node count (criterion: log-log slope <= {LINEAR_SLOPE}): "
                     f"{'met' if slope <= LINEAR_SLOPE else 'MISSED'} (slope of fxprune total time = {slope:.2f}; "
                     f"time per node goes from {per[0]:.2f} to {per[-1]:.2f} ms, x{per[-1] / per[0]:.2f}, while the "
                     f"node count grows x{scale_nodes(results):.1f}).")
    else:
        lines.append("- linear growth in node count: not measured in this run (needs two or more block counts).")
    worst = [(fx["peak_bytes"] / (fx["param_bytes"] + fx["act_bytes"]), n) for n, r in results.items()
             if (fx := r.get("fxprune")) and "error" not in fx]
    if worst:
        over = [f"{n} {w:.2f}x" for w, n in worst if w > 3]
        w, n = max(worst)
        lines.append("- peak memory within 3x (parameters + one forward pass): "
                     + (f"MISSED on {', '.join(over)}." if over else f"met (worst: {n}, {w:.2f}x)."))
    return lines + [""]


def scale_nodes(results: dict) -> float:
    nodes = [r["fxprune"]["nodes"] for n, r in results.items()
             if n.startswith("synthetic-") and "nodes" in r.get("fxprune", {})]
    return max(nodes) / min(nodes)


# --------------------------------------------------------------------------- profile

def profile(names: list[str], args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    """cProfile one fxprune analyze + compact per model (after a warm-up run), in CPU seconds."""
    import cProfile
    import pstats

    import fxprune

    for name in names:
        model, x = build(name)
        a = fxprune.analyze(model, x)
        masks = choose_masks(a, args.ratio, args.criterion, args.seed)
        fxprune.compact(model, masks, x, analysis=a)
        del a
        prof = cProfile.Profile(time.process_time)  # CPU time: robust to other load on the machine
        prof.enable()
        a = fxprune.analyze(model, x)
        fxprune.compact(model, masks, x, analysis=a)
        prof.disable()
        for key in ("cumulative", "tottime"):
            print(f"\n===== {name}: fxprune analyze + compact, top {args.top} by {key} =====")
            pstats.Stats(prof, stream=sys.stdout).strip_dirs().sort_stats(key).print_stats(args.top)
        if args.profile_out:
            out = Path(args.profile_out) / f"{name}.prof"
            out.parent.mkdir(parents=True, exist_ok=True)
            prof.dump_stats(out)
            print(f"saved {out}")


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="resnet18 and the 50-block synthetic network only "
                   "(--models / --blocks still override)")
    p.add_argument("--models", nargs="*", default=None, help=f"torchvision models (default {' '.join(TV_MODELS)})")
    p.add_argument("--blocks", nargs="*", type=int, default=None, help=f"synthetic block counts (default {BLOCKS})")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of each group's channels to remove")
    p.add_argument("--criterion", choices=["l1", "random"], default="l1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (best reported)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="time shown: CPU seconds of the measuring process (default; robust to other load on "
                        "the machine) or wall-clock seconds; both are kept in --json")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the measuring processes")
    p.add_argument("--budget", type=float, default=60.0, help="seconds of repeat runs per measurement at most")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement subprocess")
    p.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    p.add_argument("--no-resize", action="store_true", help="skip the resize measurements (derived vs fresh analysis)")
    p.add_argument("--doc", type=Path, default=DOC, help="markdown file to update (section '%s')" % SECTION)
    p.add_argument("--plot", type=Path, default=PLOT)
    p.add_argument("--no-doc", action="store_true", help="print the table only; write no file")
    p.add_argument("--json", type=Path, default=None, help="also save raw results here")
    p.add_argument("--profile", action="store_true",
                   help="instead of benchmarking, cProfile fxprune on the chosen models "
                        "(default resnet50 and synthetic-500)")
    p.add_argument("--top", type=int, default=25, help="rows per profile listing")
    p.add_argument("--profile-out", default=None, help="folder for .prof files (with --profile)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    models = args.models if args.models is not None else ["resnet18"] if args.quick else TV_MODELS
    blocks = args.blocks if args.blocks is not None else [50] if args.quick else BLOCKS
    if args.profile:
        names = (args.models if args.models is not None else ["resnet18"] if args.quick else ["resnet50"]) + \
            [f"synthetic-{b}" for b in (args.blocks if args.blocks is not None else [50] if args.quick else [500])]
        profile(names, args)
        return 0

    from tqdm import tqdm

    global LOAD_AT_START
    LOAD_AT_START = load_average()
    with_tp = not args.no_tp and tp_version() is not None
    if not args.no_tp and not with_tp:
        print(f"NOTE: Torch-Pruning is not importable; its columns are skipped ({TP_INSTALL}).", file=sys.stderr)
    names = list(models) + [f"synthetic-{b}" for b in blocks]
    tools = ["fxprune"] + (["tp"] if with_tp else [])
    results: dict[str, dict] = {n: {} for n in names}
    jobs = [(n, t) for n in names for t in tools] + ([] if args.no_resize else [(n, "resize") for n in models])
    for name, tool in (bar := tqdm(jobs, desc="benchmark", unit="run")):
        bar.set_postfix_str(f"{name} / {tool}")
        spec = {"model": name, "tool": tool, "ratio": args.ratio, "criterion": args.criterion,
                "seed": args.seed, "repeats": args.repeats, "budget": args.budget, "clock": args.clock,
                "threads": args.threads}
        results[name][tool] = run_worker(spec, args.timeout)
        if "error" in results[name][tool]:
            tqdm.write(f"{name} / {tool}: {results[name][tool]['error']}", file=sys.stderr)

    head, rows = table(results, names, with_tp)
    from tabulate import tabulate

    print(tabulate(rows, head, tablefmt="github", disable_numparse=True))
    resize_head, resize_rows = resize_table(results, names)
    if resize_rows:
        print("\n" + tabulate(resize_rows, resize_head, tablefmt="github", disable_numparse=True))
    synth = [n for n in names if n.startswith("synthetic-")]
    scale_lines, series = scaling(results, synth, with_tp)
    if scale_lines:
        print("\n" + "\n".join(scale_lines))
    print("\n" + "\n".join(targets(results, args, with_tp, scale_lines)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({k: {t: {f: v for f, v in r.items() if f not in ("out", "shapes")} for t, r in d.items()}
                                         for k, d in results.items()}, indent=1))
    if not args.no_doc:
        # A plot needs two or more block counts; a run with fewer leaves an existing PNG alone.
        plotted = len(synth) >= 2 and plot(
            series, args.plot, "CPU time (s)" if args.clock == "cpu" else "wall-clock time (s)")
        write_section(args.doc, SECTION, section(args, head, rows, scale_lines, plotted, with_tp, results,
                                                 (resize_head, resize_rows)))
        print(f"wrote {os.path.relpath(args.doc, Path.cwd())}" + (f" and {os.path.relpath(args.plot, Path.cwd())}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
