"""The training-methods demo at tiny settings: every method trains, compacts exactly, and shrinks."""
import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from fxprune import data

_EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(_EXAMPLES) not in sys.path:
    sys.path.insert(0, str(_EXAMPLES))  # as when run as a script: the examples import examples/common.py
_spec = importlib.util.spec_from_file_location("fxprune_demo", _EXAMPLES / "demo.py")
demo = sys.modules["fxprune_demo"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

TINY = demo.Settings(epochs=2, batch_size=64, resize_every=4)


@pytest.fixture(scope="module")
def task():
    return demo.Task("mnist1d", *data.mnist1d(num_samples=400), spatial_dims=1)  # 320 train, 80 test


@pytest.mark.parametrize("method, settings", [
    ("grow-efficient", TINY),
    ("single-shot", TINY),
    ("dst", replace(TINY, alpha=0.05)),  # a strong penalty, so that two epochs remove filters
    ("dst", replace(TINY, alpha=0.05, structured=False)),
])
def test_each_method_trains_a_smaller_model_equal_to_its_gated_one(task, method, settings):
    torch.manual_seed(0)
    model = task.model()
    dense = demo.fxprune.cost(model, task.test.tensors[0][:1])
    run = demo.train(method, model, task, settings, progress=False, test_each_epoch=False)
    if settings.structured:
        assert run.cost.flops < dense.flops and run.cost.params < dense.params
    else:  # single weights masked: the shapes stay unless whole rows died
        assert run.cost.flops <= dense.flops and run.density < 0.5
    assert run.check.exact and run.check.error < demo.TOLERANCE, run.check
    assert len(run.history) == settings.epochs * (len(task.train) // settings.batch_size)
    assert run.train_flops == run.history[-1].train_flops > 0 and run.seconds > 0 and run.cpu_seconds > 0
    assert 0 <= run.accuracy <= 1 and run.report
    if method == "single-shot":
        assert run.cost.flops <= settings.target * dense.flops
    assert (run.density is not None) == (method == "dst")


def test_run_compares_with_the_dense_model_and_plots(task, tmp_path):
    plot = tmp_path / "curves.png"
    result = demo.run(task, "grow-efficient", TINY, plot=plot, timing_repeats=1, progress=False, log=lambda s: None)
    names = [row[0] for row in result.rows]
    assert names[:2] == ["parameters", "FLOPs (batch 1)"] and "test accuracy" in names and "training FLOPs" in names
    assert all(len(row) == 4 for row in result.rows)
    assert result.dense.check is None and result.method.check.error < demo.TOLERANCE
    assert result.method.cost.flops < result.dense.cost.flops
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_prints_the_table(tmp_path, capsys):
    threads = torch.get_num_threads()
    plot = tmp_path / "out" / "curves.png"
    try:
        code = demo.main(["--dataset", "digits", "--epochs", "1", "--method", "single-shot", "--plot", str(plot)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0
    assert "| parameters" in out and "single-shot" in out and "equal" in out
    assert plot.is_file()


def test_load_task_reads_an_image_folder(tmp_path):
    for label, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.new("RGB", (20 + i, 12), color).save(tmp_path / label / f"{i}.png")
    task = demo.load_task("mnist1d", tmp_path, image_size=16)
    assert task.spatial_dims == 2 and task.in_channels == 3 and task.num_classes == 2
    assert task.train.tensors[0].shape[1:] == (3, 16, 16) and len(task.train) + len(task.test) == 10
    assert task.model()(task.test.tensors[0]).shape == (len(task.test), 2)
