"""benchmarks/methods.py at tiny settings: the rows it reports, its summaries, targets and section."""
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # as when run as a script: it imports benchmarks/report.py
_spec = importlib.util.spec_from_file_location("fxprune_methods_benchmark", BENCHMARKS / "methods.py")
methods = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(methods)

FIELDS = {"method", "seed", "accuracy", "flops", "params", "train_flops", "wall_s", "cpu_s", "step_ms", "resize_s",
          "error", "exact", "density", "flops_ratio", "params_ratio", "train_flops_ratio", "wall_s_ratio",
          "cpu_s_ratio", "points"}


def test_one_epoch_run_writes_rows_and_section(tmp_path, monkeypatch):
    doc, png, rows_json = tmp_path / "benchmarks.md", tmp_path / "methods.png", tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / "methods.py"), "--seeds", "1", "--epochs", "1",
                                      "--mlp-epochs", "1", "--doc", str(doc), "--plot", str(png),
                                      "--json", str(rows_json)])  # the command the doc names
    threads = methods.torch.get_num_threads()
    try:
        assert methods.main() == 0
    finally:
        methods.torch.set_num_threads(threads)
    rows = json.loads(rows_json.read_text())
    assert [r["method"] for r in rows["resnet"]] == list(methods.METHODS)
    assert [r["method"] for r in rows["mlp"]] == ["dense", "dst"]
    for r in rows["resnet"] + rows["mlp"]:
        assert set(r) == FIELDS and r["seed"] == 0
        assert 0 <= r["accuracy"] <= 1 and r["flops"] > 0 and r["train_flops"] > 0 and r["cpu_s"] > 0
        assert r["exact"] and r["error"] < 1e-4  # the compact model equals the gated one
    dense, grow, _, single = rows["resnet"]
    assert dense["flops_ratio"] == dense["wall_s_ratio"] == 1 and dense["points"] == 0
    assert grow["flops_ratio"] < 1 and grow["train_flops_ratio"] < 1 and single["flops_ratio"] <= 0.5
    assert rows["mlp"][1]["density"] < 1  # DST masks single weights of the MLP
    text = doc.read_text()
    assert methods.SECTION in text and "Command: `python benchmarks/methods.py --seeds 1" in text
    assert "| grow-efficient |" in text and "![accuracy against FLOPs](methods.png)" in text
    assert "- grow-efficient within 1 point of dense" in text and "- dst (unstructured" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _row(method: str, seed: int, accuracy: float, flops_ratio: float, wall_ratio: float, density: float = 1.0):
    row = dict.fromkeys(FIELDS - {"method", "seed", "exact"}, 1.0)
    row.update(method=method, seed=seed, accuracy=accuracy, flops_ratio=flops_ratio, wall_s_ratio=wall_ratio,
               density=density, exact=True)
    return row


def test_summaries_and_targets():
    resnet = [_row("dense", 0, 0.99, 1, 1), _row("grow-efficient", 0, 0.985, 0.5, 0.6),
              _row("dense", 1, 0.97, 1, 1), _row("grow-efficient", 1, 0.965, 0.48, 0.9)]
    for r in resnet:
        r["points"] = 100 * (r["accuracy"] - (0.99 if r["seed"] == 0 else 0.97))
    summary = methods.summarize(resnet)
    assert [s["method"] for s in summary] == ["dense", "grow-efficient"]
    grow = summary[1]
    assert grow["seeds"] == 2 and grow["accuracy"] == pytest.approx(0.975)
    assert grow["accuracy_std"] == pytest.approx(0.01414, abs=1e-4) and grow["points"] == pytest.approx(-0.5)
    mlp = methods.summarize([_row("dense", 0, 0.98, 1, 1), _row("dst", 0, 0.965, 1, 2, density=0.08)])
    mlp[1]["points"] = -1.5
    lines = methods.targets(summary, mlp)
    assert len(lines) == 2  # no single-shot rows: its target is left out
    assert "accuracy -0.50 points vs dense (met" in lines[0] and "FLOPs 0.490 of dense (met" in lines[0]
    assert "training wall-clock 0.75x dense (MISSED" in lines[0]
    assert "accuracy -1.50 points (MISSED)" in lines[1] and "weights remaining 8.00% (met)" in lines[1]


def test_step_times_leave_out_the_resizes():
    seconds = [0.1 * (i + 1) for i in range(10)]
    resize = [0.0] * 10
    for i in (4, 8):  # resizes before steps 5 and 9 took 1 s each
        seconds[i:] = [s + 1.0 for s in seconds[i:]]
        resize[i] = 1.0
    history = [SimpleNamespace(seconds=s, resize_seconds=r) for s, r in zip(seconds, resize)]
    assert methods._step_times(history) == pytest.approx([0.1] * 9)
