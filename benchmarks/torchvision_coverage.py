#!/usr/bin/env python
"""How much of every torchvision classification model fxprune can compact exactly.

For each model (``weights=None``, eval mode, constant parameters and BatchNorm statistics
redrawn by ``fxprune.zoo.randomize_constants`` so that a wrongly removed or wrongly folded channel
shows in the outputs):

1. ``fxprune.analyze`` on a 1x3xSxS input (S per family, as in ``tests/test_torchvision.py``);
2. random keep-masks (fixed seed): every prunable group of more than one channel keeps
   ``round(keep * size)`` channels (at least one, at most ``size - 1``); a draw that would leave a
   tensor without channels (``MaskError``: a unit spans a whole split piece, as in ShuffleNet) is
   drawn again with the next seed, at most ``--redraws`` times;
3. ``fxprune.compact`` and ``fxprune.apply_masks`` (the reference); both run on the input and the
   relative max error ``max|ref - small| / max|ref|`` must be below ``--tolerance`` (1e-5).

When compaction fails (an exception or a mismatch), each masked group is then compacted alone
(within ``--localize-budget`` seconds) to find which groups are at fault.

Per model the table shows the channel groups: compacted exactly, flagged not prunable by the
analysis (with its reasons, shortened), prunable but of a single channel (not masked); the
removed channels that ``compact`` kept (zeroed) or folded into a consumer's bias; parameters
before and after; CPU seconds of ``analyze`` and ``compact`` (one torch thread by default).

Every model runs in its own subprocess, with a time limit (``--timeout``) and a memory limit
(``--max-memory-gb``, resident set polled by this process), so that a crash or a memory blow-up of
one model is reported and the run goes on. Models over ``--huge-params`` parameters (counted
without allocating them) are skipped by default (``--no-skip-huge`` runs them) and listed as skipped.

Usage::

    python benchmarks/torchvision_coverage.py                       # all models, writes docs/benchmarks.md
    python benchmarks/torchvision_coverage.py --models resnet18,vit_b_16 --no-doc
    python benchmarks/torchvision_coverage.py --json /tmp/coverage.json

The table is written to ``docs/benchmarks.md`` under the section "## torchvision coverage"
(only the text between that heading and the next ``## `` heading is replaced).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from report import code_version, command, load_average
from report import machine as machine_parts
from report import write_section

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## torchvision coverage"
FIXED_SIZE = {"vit": 224, "swin": 224, "maxvit": 224, "inception": 299, "googlenet": 96, "efficientnet_v2": 128}
DEFAULT_SIZE = 64
HUGE_PARAMS = 250e6  # vit_h_14, vit_l_16, vit_l_32, regnet_y_128gf (the largest below: convnext_large, 198M)


def input_size(name: str) -> int:
    return next((s for prefix, s in FIXED_SIZE.items() if name.startswith(prefix)), DEFAULT_SIZE)


@dataclass
class Zoo:
    """A collection of models for the coverage runner: how to list, build and describe them.

    ``build(name, seed)`` returns ``(model, example input)``; ``script`` is the file whose
    ``--worker`` runs one model in a subprocess (the script that made this zoo).
    """

    name: str
    section: str
    script: Path
    names: Callable[[], list[str]]
    build: Callable[[str, int], tuple[Any, Any]]
    input_size: Callable[[str], Any]
    param_count: Callable[[str], int]
    models_text: str  # how the models are built and fed, for the doc
    package: str  # the package whose version the doc names
    huge_params: float = HUGE_PARAMS
    exists: Callable[[str], bool] | None = None  # whether --models may name it (default: it is in names())


# --------------------------------------------------------------------------- reasons

def short_reason(reason: str | None) -> str:
    """A flag reason without node and module names, e.g. 'LayerNorm over channels'."""
    if not reason:
        return "(no reason given)"
    s = reason.removeprefix("not exactly prunable: ")
    s = re.sub(r"(\w+) module '[^']*'", r"\1", s)
    s = re.sub(r" at node '[^']*'", "", s)
    if m := re.fullmatch(r"reaches (.+), which fxprune has no channel rule for", s):
        return f"unknown op {m[1]}"
    s = {"reaches the model output": "model output", "comes from the model input": "model input"}.get(s, s)
    if m := re.fullmatch(r"(divides by channel values|broadcasts against channels of another tensor"
                         r"|channel selected by an integer index) at (.+)", s):
        s = f"{m[2]} {m[1].replace('channel selected by', 'selects a channel by')}"
    s = re.sub(r" normalises (over|across) ", r" \1 ", s)
    s = re.sub(r" is not understood \((\w+): .*\)$", r" not understood (\1)", s, flags=re.S)
    return s


def reason_summary(counts: dict[str, int]) -> str:
    return "; ".join(f"{r} ×{n}" if n > 1 else r for r, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# --------------------------------------------------------------------------- worker (one model)

def _write(path: str, rec: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f)
    os.replace(tmp, path)


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)[1]) / 1024
    except (OSError, TypeError):
        return None


def _tensors(out: Any) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def relative_error(expected: Any, got: Any) -> float:
    e, g = _tensors(expected), _tensors(got)
    if len(e) != len(g) or any(a.shape != b.shape for a, b in zip(e, g)):
        return float("inf")
    scale = max(float(a.abs().max()) for a in e) if e else 0.0
    diff = max(float((a.double() - b.double()).abs().max()) for a, b in zip(e, g)) if e else 0.0
    return diff / max(scale, 1e-12)


def clean_message(msg: str) -> str:
    """An exception message on one line, without fx's dumps of node metadata."""
    msg = re.sub(r" with meta=\{.*?(?=\n\n|$)", "", msg, flags=re.S)
    msg = re.sub(r"\n+While executing .*", "", msg, flags=re.S)
    return re.sub(r"\s+", " ", msg).strip()


def _failure(stage: str, exc: BaseException) -> dict:
    msg = clean_message(str(exc))
    return {"stage": stage, "type": type(exc).__name__, "message": msg,
            "where": "".join(traceback.format_tb(exc.__traceback__)[-3:])}


def build(name: str, seed: int):
    import warnings

    import torch

    from fxprune.zoo import randomize_constants, torchvision_models

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(torchvision_models(), name)(weights=None)
    randomize_constants(model, seed)  # a wrongly kept, removed or folded channel shows
    size = input_size(name)
    return model.eval(), torch.randn(1, 3, size, size)


def _torchvision_names() -> list[str]:
    from fxprune.zoo import classification_model_names

    return classification_model_names()


def _torchvision_param_count(name: str) -> int:
    from fxprune.zoo import torchvision_models

    return sum(p.numel() for p in getattr(torchvision_models(), name)(weights=None).parameters())


TORCHVISION = Zoo(
    name="torchvision", section=SECTION, script=Path(__file__).resolve(), names=_torchvision_names, build=build,
    input_size=input_size, param_count=_torchvision_param_count, package="torchvision",
    models_text="Every torchvision classification model (`weights=None`, eval mode, constant parameters and "
                "BatchNorm statistics redrawn by `fxprune.zoo.randomize_constants`), input 1x3xSxS (S = 224 for "
                "vit/swin/maxvit, 299 inception, 96 googlenet, 128 efficientnet_v2, 64 otherwise).")


def random_masks(analysis, keep: float, seed: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for g in analysis.groups:
        if g.prunable and g.size > 1:
            k = max(1, min(g.size - 1, round(keep * g.size)))
            mask = torch.zeros(g.size, dtype=torch.bool)
            mask[torch.randperm(g.size, generator=gen)[:k]] = True
            masks[g.name] = mask
    return masks


def check(model, masks: dict, x, analysis, tolerance: float) -> tuple[Any, float, dict | None, float]:
    """Compact and compare with the reference: (small model, rel. error, failure, compact CPU s)."""
    import warnings

    import torch

    import fxprune

    t0 = time.process_time()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small = fxprune.compact(model, masks, x, analysis=analysis)
    except Exception as e:  # noqa: BLE001 - every failure is reported
        return None, float("nan"), _failure("compact", e), time.process_time() - t0
    compact_s = time.process_time() - t0
    try:
        reference = fxprune.apply_masks(model, masks, x, analysis=analysis)
    except Exception as e:  # noqa: BLE001
        return small, float("nan"), _failure("apply_masks", e), compact_s
    try:
        with torch.no_grad():
            expected, got = reference(x), small(x)
    except Exception as e:  # noqa: BLE001
        return small, float("nan"), _failure("forward", e), compact_s
    err = relative_error(expected, got)
    if not err < tolerance:
        fail = {"stage": "compare", "type": "Mismatch",
                "message": f"compact differs from apply_masks: relative max error {err:.3g}", "where": ""}
        return small, err, fail, compact_s
    return small, err, None, compact_s


def worker(args) -> None:
    import torch

    import fxprune

    torch.set_num_threads(args.threads)
    rec: dict[str, Any] = {"model": args.worker, "input": args.zoo.input_size(args.worker), "stage": "build"}
    _write(args.out, rec)
    model, x = args.zoo.build(args.worker, args.seed)
    rec["input"] = "x".join(map(str, x.shape[2:]))
    rec["params_before"] = sum(p.numel() for p in model.parameters())
    rec["stage"] = "analyze"
    _write(args.out, rec)
    t0, w0 = time.process_time(), time.perf_counter()
    try:
        analysis = fxprune.analyze(model, x)
    except Exception as e:  # noqa: BLE001
        rec["failure"] = _failure("analyze", e)
        rec["untraceable"] = isinstance(e, fxprune.TraceError)
        rec["stage"] = "done"
        rec["peak_rss_mb"] = _peak_rss_mb()
        _write(args.out, rec)
        return
    rec["analyze_s"], rec["analyze_wall_s"] = time.process_time() - t0, time.perf_counter() - w0
    groups = analysis.groups
    flagged = [g for g in groups if not g.prunable]
    rec["groups"] = len(groups)
    rec["flagged"] = len(flagged)
    rec["inexact_flagged"] = sum(1 for g in flagged if not g.exact)
    rec["single"] = sum(1 for g in groups if g.prunable and g.size == 1)
    rec["reasons"] = dict(collections.Counter(short_reason(g.reason) for g in flagged))
    rec["raw_reason_counts"] = dict(collections.Counter(g.reason or "" for g in flagged))
    rec["raw_reasons"] = sorted(rec["raw_reason_counts"])
    rec["channels"] = sum(g.size for g in groups)
    rec["stage"] = "compact"
    for attempt in range(args.redraws + 1):
        rec["redraws"] = attempt
        masks = random_masks(analysis, args.keep, args.seed + attempt)
        rec["masked"] = len(masks)
        rec["removed"] = sum(int((~m).sum()) for m in masks.values())
        _write(args.out, rec)
        w0 = time.perf_counter()
        small, err, fail, compact_s = check(model, masks, x, analysis, args.tolerance)
        rec["compact_s"], rec["compact_wall_s"] = compact_s, time.perf_counter() - w0
        # A draw that empties a tensor (a unit spanning a whole split piece) is refused: draw again.
        if not (fail and fail["type"] == "MaskError" and "remove every channel" in fail["message"]):
            break
    rec["rel_error"] = err if err == err and err != float("inf") else str(err)
    if small is not None:
        rec["params_after"] = sum(p.numel() for p in small.parameters())
        report = small.meta.get("fxprune_report", [])
        rec["kept"] = sum(1 for a in report if a.action == "kept")
        rec["folded"] = sum(1 for a in report if a.action == "folded")
    rec["layers"] = len(analysis.layers)
    if analysis.layers and fail is None:  # channels as above, and every other residual branch removed
        removed = {layer.name: False for layer in analysis.layers[::2]}
        rec["layers_removed"] = len(removed)
        rec["stage"] = "remove layers"
        _write(args.out, rec)
        small, err, layer_fail, _ = check(model, {**masks, **removed}, x, analysis, args.tolerance)
        rec["layers_exact"] = layer_fail is None
        rec["params_after_layers"] = sum(p.numel() for p in small.parameters()) if small is not None else None
        fail = layer_fail
    if fail is None:
        rec["exact"] = len(masks)
    else:
        rec["failure"] = fail
        rec["exact"] = None
        rec["stage"] = "localize"
        _write(args.out, rec)
        localize(rec, model, masks, x, analysis, args)
    rec["stage"] = "done"
    rec["peak_rss_mb"] = _peak_rss_mb()
    _write(args.out, rec)


def localize(rec: dict, model, masks: dict, x, analysis, args) -> None:
    """Compact each masked group alone: which groups fail, and how."""
    start = time.perf_counter()
    exact, bad, unchecked = 0, [], 0
    for name, mask in masks.items():
        if time.perf_counter() - start > args.localize_budget:
            unchecked += 1
            continue
        _, err, fail, _ = check(model, {name: mask}, x, analysis, args.tolerance)
        if fail is None:
            exact += 1
        else:
            bad.append({"group": name, "size": analysis.group(name).size, "stage": fail["stage"],
                        "type": fail["type"], "message": fail["message"][:300]})
        _write(args.out, {**rec, "exact": exact, "bad_groups": bad})
    rec.update(exact=exact, bad_groups=bad, unchecked=unchecked)


# --------------------------------------------------------------------------- parent

def param_counts(names: list[str], zoo: Zoo) -> dict[str, int | None]:
    """Parameter counts without allocating parameters (factories redirected to the meta device)."""
    import warnings

    import torch
    from torch.overrides import TorchFunctionMode

    factories = {torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn}

    class MetaFactories(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func in factories:
                kwargs["device"] = "meta"
            return func(*args, **kwargs)

    out = {}
    for name in names:
        try:
            with warnings.catch_warnings(), MetaFactories():
                warnings.simplefilter("ignore")
                out[name] = zoo.param_count(name)
        except Exception:  # noqa: BLE001 - unknown size: run the model
            out[name] = None
    return out


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)[1]) / 1024
    except (OSError, TypeError):
        return 0.0


def run_one(name: str, args) -> dict:
    fd, out = tempfile.mkstemp(prefix=f"fxprune-cov-{name}-", suffix=".json")
    os.close(fd)
    os.unlink(out)
    cmd = [sys.executable, str(args.zoo.script), "--worker", name, "--out", out,
           "--seed", str(args.seed), "--keep", str(args.keep), "--tolerance", str(args.tolerance),
           "--threads", str(args.threads), "--localize-budget", str(args.localize_budget),
           "--redraws", str(args.redraws)]
    err_path = out + ".stderr"
    start = time.perf_counter()
    killed, peak = None, 0.0
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        while proc.poll() is None:
            rss = _rss_mb(proc.pid)
            peak = max(peak, rss)
            if time.perf_counter() - start > args.timeout:
                killed = f"timed out after {args.timeout:.0f} s"
            elif rss > args.max_memory_gb * 1024:
                killed = f"resident memory {rss / 1024:.1f} GiB over the {args.max_memory_gb:g} GiB limit"
            if killed:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.25)
    rec: dict[str, Any] = {"model": name, "input": args.zoo.input_size(name)}
    try:
        with open(out) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        pass
    stderr = Path(err_path).read_text(errors="replace")
    for p in (out, err_path):
        Path(p).unlink(missing_ok=True)
    rec["wall_s"] = time.perf_counter() - start
    rec.setdefault("peak_rss_mb", peak or None)
    if killed or proc.returncode != 0 or rec.get("stage") != "done":
        stage = rec.get("stage", "start")
        if killed:
            kind, msg = "Killed", f"{killed} (during {stage})"
        else:
            lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
            kind = "Crash"
            msg = f"worker exited with status {proc.returncode} during {stage}: " + (lines[-1] if lines else "no output")
        rec.setdefault("failure", {"stage": stage, "type": kind, "message": msg, "where": stderr[-2000:]})
    return rec


def status(rec: dict) -> str:
    f = rec.get("failure")
    if f and rec.get("untraceable"):
        return "untraceable: " + f"{f['message']}".replace("\n", " ")[:150].replace("|", "\\|")
    if f:
        msg = f"{f['type']}: {f['message']}".replace("\n", " ")
        msg = msg[:60] + " … " + msg[-90:] if len(msg) > 153 else msg  # the end names the cause
        return f"FAILED ({f['stage']}) " + msg.replace("|", "\\|")
    if rec.get("masked") == 0:
        return "exact (nothing to prune)"
    if rec.get("redraws"):
        return f"exact ({rec['redraws']} mask redraw{'s' if rec['redraws'] > 1 else ''})"
    return "exact"


def _fmt_s(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) else "–"


def _fmt_m(v: Any) -> str:
    return f"{v / 1e6:.2f}" if isinstance(v, (int, float)) else "–"


def _fmt_i(v: Any) -> str:
    return str(v) if isinstance(v, int) else "–"


def table(results: list[dict]) -> str:
    from tabulate import tabulate

    head = ["model", "input", "params M", "params M after", "groups", "exact", "flagged", "1-channel",
            "kept", "folded", "layers", "params M after layers", "analyze s", "compact s", "status", "flagged reasons"]
    rows = []
    for r in results:
        exact = r.get("exact")
        if r.get("failure") and isinstance(exact, int):
            exact = f"{exact} of {r.get('masked')}"
        rows.append([r["model"], r.get("input"), _fmt_m(r.get("params_before")), _fmt_m(r.get("params_after")),
                     _fmt_i(r.get("groups")), exact if isinstance(exact, str) else _fmt_i(exact),
                     _fmt_i(r.get("flagged")), _fmt_i(r.get("single")), _fmt_i(r.get("kept")),
                     _fmt_i(r.get("folded")), _fmt_i(r.get("layers")), _fmt_m(r.get("params_after_layers")),
                     _fmt_s(r.get("analyze_s")), _fmt_s(r.get("compact_s")),
                     status(r), reason_summary(r.get("reasons", {})).replace("|", "\\|")])
    return tabulate(rows, head, tablefmt="github", disable_numparse=True)


def totals(results: list[dict], skipped: dict[str, int | None]) -> str:
    n = len(results)
    untraceable = sum(1 for r in results if r.get("untraceable"))
    failed = sum(1 for r in results if r.get("failure")) - untraceable
    flagged = sum(1 for r in results if r.get("flagged"))
    beyond = sum(1 for r in results if set(r.get("reasons", {})) - {"model output"})
    exact = n - failed - untraceable
    line = (f"{n} models: {exact} exact, {flagged} with flagged groups ({beyond} with flagged groups "
            f"other than the model output), {failed} failed")
    if untraceable:
        line += (f", {untraceable} untraceable (TraceError); {exact} of {n - untraceable} traceable models pass "
                 f"({exact / max(n - untraceable, 1):.0%})")
    with_layers = [r for r in results if r.get("layers")]
    line += (f"; {len(with_layers)} models expose {sum(r['layers'] for r in with_layers)} removable layers, "
             f"and removing every other one is exact in {sum(1 for r in with_layers if r.get('layers_exact'))}")
    if skipped:
        line += "; skipped (over the size limit): " + ", ".join(
            f"{k} ({_fmt_m(v)} M params)" for k, v in skipped.items())
    return line


def failures_text(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        f = r.get("failure")
        if not f:
            continue
        msg = f["message"].replace("\n", " ")
        out.append(f"- **{r['model']}** ({f['stage']}): `{f['type']}: {msg[:600]}`")
        for b in r.get("bad_groups", [])[:5]:
            out.append(f"  - group `{b['group']}` ({b['size']} channels) alone: {b['stage']}: "
                       f"`{b['type']}: {b['message'][:200]}`")
        if len(r.get("bad_groups", [])) > 5:
            out.append(f"  - … {len(r['bad_groups']) - 5} more failing groups")
        if r.get("bad_groups") is not None and not r["bad_groups"]:
            out.append("  - every masked group compacts exactly alone; only the combination fails")
        if r.get("unchecked"):
            out.append(f"  - {r['unchecked']} groups not checked alone (time budget)")
    return out


def machine(threads: int, packages: tuple[str, ...] = ("torchvision",)) -> str:
    """The machine (see report.machine) with torch's threads, the packages' versions and the load at the end."""
    from importlib.metadata import PackageNotFoundError, version

    def named(package: str) -> str:
        try:
            return f"{package} {version(package)}"
        except PackageNotFoundError:
            return f"{package} (version unknown)"

    load = load_average()
    return machine_parts([named(p) for p in packages], f" ({threads} intra-op thread{'s' if threads != 1 else ''} per model)",
                         tail=["load average %.1f / %.1f / %.1f at the end of the run" % load] if load is not None else [])


def run_info(args, elapsed: float, code_at_start: str | None = None) -> dict:
    """What the doc section says about the run: command, machine, code, settings."""
    code = code_version()
    if code_at_start and code_at_start != code:  # every model imports fxprune afresh
        code = f"{code_at_start} at the start of the run, {code} at its end"
    packages = tuple(dict.fromkeys(("torchvision", args.zoo.package)))
    return {"command": command(args.zoo.script),
            "machine": machine(args.threads, packages), "code": code, "elapsed_s": elapsed,
            **{k: getattr(args, k) for k in ("keep", "seed", "tolerance", "timeout", "max_memory_gb", "threads", "redraws")}}


def section(results: list[dict], skipped: dict, info: dict, zoo: Zoo) -> str:
    distinct = collections.Counter()
    for r in results:
        for reason in r.get("reasons", {}):
            distinct[reason] += 1
    lines = [zoo.section, "", f"Command: `{info['command']}`", "", f"Machine: {info['machine']}.", "",
             f"Code: {info['code']}.", "",
             f"{zoo.models_text} Every prunable group of more than one channel keeps a "
             f"random {info['keep']:.0%} of its channels (seed {info['seed']}; a draw that would leave some tensor "
             f"without any channel is refused by `compact` with a MaskError and drawn again with the next seed, "
             f"at most {info.get('redraws', 5)} times); `compact` must match `apply_masks` "
             f"to a relative max error below {info['tolerance']:g}. \"exact\": masked groups compacted "
             f"exactly (when the model fails, the groups that compact exactly alone, out of the masked "
             f"ones); \"flagged\": groups `analyze` marks not prunable (reasons shortened, × count); "
             f"\"1-channel\": prunable groups of one channel (not masked); \"kept\" / \"folded\": removed "
             f"channels that `compact` kept zeroed / folded into a consumer's bias; \"layers\": removable layers "
             f"(residual branches y = x + F(x), `analysis.layers`), of which every other one is then removed "
             f"together with the channel masks (checked against `apply_masks` the same way), leaving "
             f"\"params M after layers\". Times are CPU seconds "
             f"of the model's subprocess. Each model runs in its own subprocess (limit {info['timeout']:.0f} s, "
             f"{info['max_memory_gb']:g} GiB resident). Whole run: {info['elapsed_s'] / 60:.1f} min.", "",
             f"**{totals(results, skipped)}.**", "", table(results), ""]
    fails = failures_text(results)
    if fails:
        lines += ["Failures:", "", *fails, ""]
    if distinct:
        lines += ["Distinct flag reasons (number of models):", "",
                  *[f"- {r} ({n})" for r, n in sorted(distinct.items(), key=lambda kv: (-kv[1], kv[0]))], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None, zoo: Zoo = TORCHVISION) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="comma-separated model names (default: all)")
    p.add_argument("--skip-huge", action=argparse.BooleanOptionalAction, default=True,
                   help="skip models over --huge-params parameters (default: on)")
    p.add_argument("--huge-params", type=float, default=zoo.huge_params,
                   help="parameter count above which --skip-huge skips a model (default %(default).3g)")
    p.add_argument("--keep", type=float, default=0.7, help="fraction of each group's channels kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--redraws", type=int, default=5,
                   help="new random masks (seed + 1, + 2, ...) when a draw empties a tensor (MaskError)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="relative max error counted as exact")
    p.add_argument("--timeout", type=float, default=900, help="seconds per model")
    p.add_argument("--max-memory-gb", type=float, default=8, help="resident memory limit per model")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per model")
    p.add_argument("--localize-budget", type=float, default=120,
                   help="seconds spent compacting groups one by one after a failure")
    p.add_argument("--doc", type=Path, default=DOC)
    p.add_argument("--no-doc", action="store_true", help="print only; do not write the doc")
    p.add_argument("--json", type=Path, default=None, help="also save the raw results here")
    p.add_argument("--from-json", type=Path, default=None,
                   help="render the table from a --json file of an earlier run instead of running")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.zoo = zoo
    if args.worker:
        worker(args)
        return 0

    if args.from_json:
        data = json.loads(args.from_json.read_text())
        results, skipped = data["results"], data["skipped"]
        info = data.get("info") or run_info(args, data.get("elapsed_s", float("nan")))
        for r in results:  # shorten again: the shortening may have changed since the run
            if "raw_reasons" in r and "raw_reason_counts" in r:
                r["reasons"] = dict(collections.Counter(
                    short_reason(k) for k, n in r["raw_reason_counts"].items() for _ in range(n)))
        return report(results, skipped, info, args)

    from tqdm import tqdm

    names = zoo.names()
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in names and not (zoo.exists and zoo.exists(m))]
        if unknown:
            p.error(f"unknown models: {', '.join(unknown)}")
        names = wanted
    counts = param_counts(names, zoo) if args.skip_huge else {}
    skipped = {n: c for n, c in counts.items() if c is not None and c > args.huge_params}
    if skipped:
        print("skipping (over %.3g parameters): %s" % (args.huge_params, ", ".join(
            f"{n} ({c / 1e6:.1f}M)" for n, c in skipped.items())), file=sys.stderr)
    run = [n for n in names if n not in skipped]
    results = []
    start, code_at_start = time.perf_counter(), code_version()
    bar = tqdm(run, unit="model", dynamic_ncols=True)
    for name in bar:
        bar.set_postfix_str(name)
        rec = run_one(name, args)
        results.append(rec)
        if rec.get("failure"):
            f = rec["failure"]
            bar.write(f"{name}: FAILED ({f['stage']}) {f['type']}: {f['message'][:200]}")
        if args.json:
            args.json.write_text(json.dumps({"results": results, "skipped": skipped}, indent=1))
    info = run_info(args, time.perf_counter() - start, code_at_start)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "skipped": skipped, "info": info}, indent=1))
    return report(results, skipped, info, args)


def report(results: list[dict], skipped: dict, info: dict, args) -> int:
    print(table(results))
    print(totals(results, skipped))
    if not args.no_doc:
        write_section(args.doc, args.zoo.section, section(results, skipped, info, args.zoo))
        print(f"wrote section '{args.zoo.section}' of {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
