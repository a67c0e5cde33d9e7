"""The analysis that ``compact`` and ``grow`` return with ``return_analysis=True``.

On random architectures and masks (tests/strategies.py), it must equal a fresh ``analyze`` of the
result (groups, their sizes, reasons and members, removable layers, tainted nodes), and rewriting
the result with it must give the same model as rewriting with a fresh analysis. Where only widths
change, the analysis is derived without tracing (its ``gm`` is the result itself).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from strategies import SeqSpec, masks_for, model_specs, sequence_specs
from test_layer_properties import draw_growth, draw_layers_removed, residual_model_specs
from test_properties import assert_outputs_close, build, out
from test_sequence_properties import build as build_sequence
from test_sequence_properties import draw_masks as draw_sequence_masks

EXAMPLES = settings().max_examples * 2 // 5  # 40 in the "ci" profile, 800 in "large"


def summary(analysis: fxprune.Analysis) -> dict:
    """Everything an analysis says about its model, as plain values."""
    return {
        "groups": [(g.name, g.size, g.prunable, g.reason, g.producers, g.exact, g.blocked,
                    [(m.kind, m.name, m.dim, m.index.tolist(), m.unit.tolist()) for m in g.members])
                   for g in analysis.groups],
        "layers": [(layer.name, layer.add, layer.skip, layer.branch_out, layer.nodes, layer.modules, layer.groups)
                   for layer in analysis.layers],
        "tainted": sorted(analysis.tainted),
    }


def assert_same_analysis(derived: fxprune.Analysis, fresh: fxprune.Analysis) -> None:
    got, want = summary(derived), summary(fresh)
    assert [g[:7] for g in got["groups"]] == [g[:7] for g in want["groups"]], "groups differ"
    for g, h in zip(got["groups"], want["groups"]):
        assert g[7] == h[7], f"members of group {g[0]!r} differ"
    assert got["layers"] == want["layers"]
    assert got["tainted"] == want["tainted"]


def assert_same_model(a: torch.fx.GraphModule, b: torch.fx.GraphModule, x) -> None:
    """Same nodes, same tensors, same outputs (a fresh analysis traces the model again, which may
    spell an argument differently: ``dim=1`` for ``1``)."""
    assert [(n.name, n.op, n.target) for n in a.graph.nodes] == [(n.name, n.op, n.target) for n in b.graph.nodes]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert_outputs_close(out(a.eval(), x), out(b.eval(), x), "the two rewrites")


def quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def assert_same_compaction(model, masks, x, derived: fxprune.Analysis, fresh: fxprune.Analysis) -> None:
    """``compact`` gives the same model with either analysis, or refuses the masks with either (compacting
    twice can meet a limitation, such as a computed channel-shuffle group count, whatever the analysis)."""
    results = []
    for analysis in (derived, fresh):
        try:
            results.append(quietly(fxprune.compact, model, masks, x, analysis))
        except (fxprune.CompactError, fxprune.MaskError) as e:
            results.append(type(e))
    if isinstance(results[0], type) or isinstance(results[1], type):
        assert results[0] == results[1]
    else:
        assert_same_model(*results, x)


def check_compaction(data, model, x, analysis, masks) -> None:
    small, derived = quietly(fxprune.compact, model, masks, x, analysis, return_analysis=True)
    fresh = fxprune.analyze(small, x)
    assert_same_analysis(derived, fresh)
    again = data.draw(masks_for(fresh), label="masks of the compact model").masks
    assert_same_compaction(small, again, x, derived, fresh)


@settings(max_examples=EXAMPLES)
@given(spec=model_specs(), data=st.data())
def test_compacted_analysis_equals_a_fresh_one(spec, data):
    model, x, analysis = build(spec)
    check_compaction(data, model, x, analysis, data.draw(masks_for(analysis), label="masks").masks)


@settings(max_examples=EXAMPLES // 2)
@given(spec=residual_model_specs(), data=st.data())
def test_compacted_analysis_with_removed_layers_equals_a_fresh_one(spec, data):
    model, x, analysis = build(spec)
    masks = {**data.draw(masks_for(analysis), label="masks").masks, **draw_layers_removed(data, analysis)}
    check_compaction(data, model, x, analysis, masks)


@settings(max_examples=EXAMPLES // 2)
@given(spec=sequence_specs(), data=st.data())
def test_compacted_analysis_of_sequence_models_equals_a_fresh_one(spec, data):
    model, x, analysis = build_sequence(spec)
    masks = draw_sequence_masks(data, analysis)
    small = quietly(fxprune.compact, model, masks, x, analysis)
    try:
        fresh = fxprune.analyze(small, x)
    except fxprune.TraceError:  # units zeroed inside an attention or RNN module: it cannot be traced again
        with pytest.raises(fxprune.TraceError):
            quietly(fxprune.compact, model, masks, x, analysis, return_analysis=True)
        return
    _, derived = quietly(fxprune.compact, model, masks, x, analysis, return_analysis=True)
    assert_same_analysis(derived, fresh)


def check_growth(data, model, x, analysis) -> None:
    widen, insert = draw_growth(data, analysis)
    insert = insert if data.draw(st.booleans(), label="insert blocks too") else {}
    try:
        big, _, derived = fxprune.grow(model, x, widen=widen, insert=insert, analysis=analysis, return_analysis=True)
    except fxprune.GrowError as e:  # a layout the placement rule refuses
        assert "cannot widen" in str(e) or "single channel" in str(e)
        return
    fresh = fxprune.analyze(big, x)
    assert_same_analysis(derived, fresh)
    assert_same_compaction(big, data.draw(masks_for(fresh), label="masks of the grown model").masks, x, derived, fresh)


@settings(max_examples=EXAMPLES)
@given(spec=model_specs(), data=st.data())
def test_grown_analysis_equals_a_fresh_one(spec, data):
    check_growth(data, *build(spec))


@settings(max_examples=EXAMPLES // 2)
@given(spec=sequence_specs(), data=st.data())
def test_grown_analysis_of_sequence_models_equals_a_fresh_one(spec, data):
    check_growth(data, *build_sequence(spec))


class TwoBlocks(nn.Module):
    """conv-bn-relu, then a residual block of two convs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.body(x)
        return self.head(x.mean((2, 3)))


def test_the_analysis_is_derived_without_tracing_where_only_widths_change():
    model, x = TwoBlocks().eval(), torch.randn(2, 3, 8, 8)
    analysis = fxprune.analyze(model, x)
    masks = {"stem.0": torch.arange(8) % 4 != 0, "body.0": torch.arange(6) != 2}
    small, mapping, derived = fxprune.compact(model, masks, x, analysis, return_mapping=True, return_analysis=True)
    assert derived.gm is small and set(mapping) == set(small.state_dict())
    assert [g.size for g in derived.groups if g.prunable] == [6, 5]
    big, _, grown = fxprune.grow(small, x, widen={"body.0": 3}, analysis=derived, return_analysis=True)
    assert grown.gm is big and grown.group("body.0").size == 8
    assert_same_analysis(grown, fxprune.analyze(big, x))


def test_the_analysis_is_fresh_where_a_layer_is_removed():
    model, x = TwoBlocks().eval(), torch.randn(2, 3, 8, 8)
    analysis = fxprune.analyze(model, x)
    small, derived = fxprune.compact(model, {analysis.layers[0].name: False}, x, analysis, return_analysis=True)
    assert derived.gm is not small and not derived.layers
    assert_same_analysis(derived, fxprune.analyze(small, x))


def shapes_of(gm: torch.fx.GraphModule) -> list:
    """Every node's name and the shapes in its ``tensor_meta``."""
    def shape(meta):
        return tuple(meta.shape) if hasattr(meta, "shape") else [shape(m) for m in meta] \
            if isinstance(meta, (list, tuple)) else None
    return [(n.name, shape(n.meta.get("tensor_meta"))) for n in gm.graph.nodes if n.users or n.op == "output"]


@settings(max_examples=EXAMPLES)
@given(spec=st.one_of(model_specs(), sequence_specs()), data=st.data())
def test_unverified_compaction_predicts_the_shapes_it_would_check(spec, data):
    model, x = spec.build()
    analysis = fxprune.analyze(model, x)
    masks = draw_sequence_masks(data, analysis) if isinstance(spec, SeqSpec) else \
        data.draw(masks_for(analysis), label="masks").masks
    checked = quietly(fxprune.compact, model, masks, x, analysis)
    predicted = quietly(fxprune.compact, model, masks, x, analysis, verify=False)
    assert shapes_of(predicted) == shapes_of(checked)
    assert_same_model(predicted, checked, x)
