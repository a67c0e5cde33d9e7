"""The magnitude-pruning example at tiny settings: exact compaction, a smaller model, magnitude masks."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import fxprune
from fxprune import data

_EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(_EXAMPLES) not in sys.path:
    sys.path.insert(0, str(_EXAMPLES))  # as when run as a script: the examples import examples/common.py
_spec = importlib.util.spec_from_file_location("fxprune_magnitude_pruning", _EXAMPLES / "magnitude_pruning.py")
magnitude = sys.modules["fxprune_magnitude_pruning"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(magnitude)


def _tiny_task(name: str) -> "magnitude.Task":
    if name == "mnist1d":  # generate only 320 signals (256 train, 64 test)
        return magnitude.Task(name, *data.mnist1d(num_samples=320), spatial_dims=1)
    task = magnitude.load_task(name)
    return magnitude.Task(name, TensorDataset(*task.train[:256]), task.test, task.spatial_dims)


@pytest.mark.parametrize("dataset", ["mnist1d", "digits"])
def test_run_is_exact_and_smaller(dataset):
    r = magnitude.run(_tiny_task(dataset), epochs=1, keep=0.5, timing_repeats=1, log=lambda s: None)
    assert r.error < magnitude.TOLERANCE
    before, after = r.cost_before, r.cost_after
    assert after.params < before.params / 3 and after.flops < before.flops / 3
    assert sum(p.numel() for p in r.compact.parameters()) == after.params
    assert len(r.rows) == 5 and r.rows[0][0] == "parameters"


def test_magnitude_masks_follow_filter_norms():
    torch.manual_seed(0)
    model = magnitude.build_model(1, width=8, blocks=1).eval()
    analysis = fxprune.analyze(model, torch.randn(1, 1, 40))
    residual = analysis.group("0")  # the stem and the block's conv2 write the same channels
    assert set(residual.producers) == {"0", "3.conv2"}
    expected = sum(model.get_submodule(p).weight.detach().flatten(1).norm(dim=1) for p in residual.producers)
    torch.testing.assert_close(magnitude.unit_scores(residual, model), expected)

    masks = magnitude.magnitude_masks(analysis, model, keep=0.25)
    assert set(masks) == {g.name for g in analysis.groups if g.prunable}
    for name, mask in masks.items():
        assert int(mask.sum()) == max(1, round(0.25 * len(mask)))
    assert masks["0"][expected.topk(2).indices].all()
    assert int(magnitude.magnitude_masks(analysis, model, keep=0.01)["0"].sum()) == 1
