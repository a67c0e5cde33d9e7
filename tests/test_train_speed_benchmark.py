"""benchmarks/train_speed.py at tiny settings, in one process: its rows, measurements and section."""
import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # as when run as a script: it imports report.py and methods.py
_spec = importlib.util.spec_from_file_location("fxprune_train_speed_benchmark", BENCHMARKS / "train_speed.py")
train_speed = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_speed)


def test_tiny_run_writes_rows_measurements_and_section(tmp_path, monkeypatch):
    doc, png, out = tmp_path / "benchmarks.md", tmp_path / "train_speed.png", tmp_path / "result.json"
    argv = ["--seeds", "1", "--epochs", "1", "--width", "8", "--depth", "8", "--repeats", "2", "--round-to", "4",
            "--resize-models", "cifar_resnet", "--in-process", "--doc", str(doc), "--plot", str(png), "--json", str(out)]
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / "train_speed.py"), *argv])  # the command the doc names
    threads = torch.get_num_threads()
    try:
        assert train_speed.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["method"] for r in rows] == list(train_speed.METHODS)
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["flops"] > 0 and r["wall_s"] > 0 and r["peak_mib"] >= 0 and r["exact"]
    dense, grow, single, dst = rows
    assert dense["flops_ratio"] == dense["wall_s_ratio"] == 1 and dense["points"] == 0
    assert grow["flops_ratio"] < 1 and grow["train_flops_ratio"] < 1 and dst["train_flops_ratio"] == 1
    assert set(result["widths"]["flops"]) == {"dense", "grow-efficient", "single-shot", "dst"}
    assert result["widths"]["channels_last"]["dense"]["ratio"] == 1
    assert result["overhead"]["gated_ms"] > 0 and result["overhead"]["ratio"] > 0
    assert [r["model"] for r in result["resizes"]] == ["cifar_resnet"] and result["resizes"][0]["median_s"] > 0
    text = doc.read_text()
    assert train_speed.SECTION in text and "Command: `python benchmarks/train_speed.py --seeds 1" in text
    assert "| grow-efficient |" in text and "![accuracy against training time](train_speed.png)" in text
    assert "- single-shot: <= 50% inference FLOPs" in text and "a GrowEfficient step <= 1.1x" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_targets_say_met_or_missed():
    summary = [{"method": "grow-efficient", "flops_ratio": 0.48, "points": -0.5, "wall_s_ratio": 0.8, "cpu_s_ratio": 0.7},
               {"method": "single-shot", "flops_ratio": 0.52, "points": 0.2, "wall_s_ratio": 0.5, "cpu_s_ratio": 0.5}]
    lines = train_speed.targets(summary, {"ratio": 1.05, "gated_ms": 105, "plain_ms": 100},
                                [{"model": "resnet50", "median_s": 0.2, "min_s": 0.18}])
    assert "(0.480: met)" in lines[0] and "(-0.50: met)" in lines[0]
    assert "0.80x: MISSED" in lines[0] and "0.520: MISSED" in lines[1] and "0.50x: met" in lines[1]
    assert "1.050x" in lines[2] and "met)" in lines[2]
    assert "0.200 s per call" in lines[3] and "MISSED (target <= 0.15 s)" in lines[3]
