"""benchmarks/latency.py at --quick settings: the rows it reports and the section it writes."""
import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # as when run as a script: it imports benchmarks/report.py
_spec = importlib.util.spec_from_file_location("fxprune_latency_benchmark", BENCHMARKS / "latency.py")
latency = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(latency)

FIELDS = {"model", "input", "backend", "round_to", "target", "keep", "flops_ratio", "clock", "dense_ms",
          "compact_ms", "latency_ratio", "gap", "wall_ratio"}


def test_quick_run(tmp_path, monkeypatch):
    doc, png, rows_json = tmp_path / "benchmarks.md", tmp_path / "latency.png", tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / "latency.py"), "--quick", "--targets", "0.5", "--doc", str(doc),
                                      "--plot", str(png), "--json", str(rows_json)])  # the command the doc names
    assert latency.main() == 0
    rows = json.loads(rows_json.read_text())
    assert {(r["backend"], r["round_to"], r["target"]) for r in rows} == {
        (b, r, 0.5) for b in ("eager", "onnxruntime") for r in (None, 8)}
    for r in rows:
        assert set(r) == FIELDS and r["model"] == "small_resnet" and r["input"] == "1x3x32x32"
        assert abs(r["flops_ratio"] - r["target"]) <= 0.05  # round_to=8 moves a small model's FLOPs in steps
        assert r["dense_ms"] > 0 and r["compact_ms"] > 0
        assert abs(r["latency_ratio"] - r["compact_ms"] / r["dense_ms"]) < 1e-9
        assert abs(r["gap"] - (r["latency_ratio"] - r["flops_ratio"])) < 1e-9
    text = doc.read_text()
    assert latency.SECTION in text and "Command: `python benchmarks/latency.py --quick" in text
    assert "| small_resnet | 1x3x32x32 | onnxruntime |" in text
    assert "![latency ratio against FLOPs ratio](latency.png)" in text
    assert "resnet50 compacted to 50% of its FLOPs" in text and "not measured in this run" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_lands_near_the_target():
    model, x = latency.build("small_resnet", resolution=16)
    variant = latency.search(model, x, 0.4, None)
    assert abs(variant.flops_ratio - 0.4) <= latency.TOLERANCE
    assert 0 < variant.keep < 1
