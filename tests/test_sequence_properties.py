"""Property tests on random sequence models: compact == apply_masks, the input model untouched,
the parameter count predicted from the masks, and compacting twice == compacting once.

Models come from ``sequence_specs`` in tests/strategies.py (token ids -> nn.Embedding, or float
features -> Linear; 1-3 blocks of nn.LSTM / nn.GRU / nn.RNN, nn.MultiheadAttention self-attention,
Linear(+ReLU), residual adds; a Linear head, maybe a decoder tied to the embedding), masks from
``masks_for``. Profiles as in test_properties.py (FXPRUNE_HYPOTHESIS_PROFILE=ci|large|dev).
"""
from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.modules.recurrent import RecurrentStack
from strategies import (Attention, Embed, Recurrent, Residual, SeqSpec, emptied_tensors, group_votes,
                        masks_for, producer_units, sequence_specs)
from strategies import Linear as LinearSpec
from test_properties import (assert_outputs_close, out, quiet_compact, state, storages,
                             surviving_units)

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def build(spec: SeqSpec) -> tuple[nn.Module, torch.Tensor, fxprune.Analysis]:
    model, x = spec.build()
    assert tuple(out(model, x).shape) == spec.out_shape, "the generator's shape bookkeeping is wrong"
    return model, x, fxprune.analyze(model, x)


def directions(rnn: Recurrent) -> list[str]:
    return ["", "_reverse"] if rnn.bidirectional else [""]


RNN_UNITS = re.compile(r"^(.*)\.(hidden|proj)_(l\d+(?:_reverse)?)$")  # "<rnn>.hidden_l1_reverse"


def emptied_directions(analysis: fxprune.Analysis, keep: list[torch.Tensor]) -> list[str]:
    """The recurrent producers (one layer and direction's hidden or projected units) that would keep
    no unit: compact then fails (test_masks_emptying_one_direction_are_a_mask_error)."""
    return [p for p, (gi, u) in producer_units(analysis).items() if RNN_UNITS.match(p) and not bool(keep[gi][u].any())]


def keep_unit(analysis: fxprune.Analysis, masks: dict, gi: int, ui: int) -> None:
    """Make every mask that covers unit ``ui`` of group ``gi`` keep it (keys read as in group_votes)."""
    groups, units = {g.name: i for i, g in enumerate(analysis.groups)}, producer_units(analysis)
    for key, m in masks.items():
        k = groups.get(key)
        if k is not None and len(m) == analysis.groups[k].size:
            if k == gi:
                m[ui] = True
        elif units[key][0] == gi:
            m[units[key][1] == ui] = True


def draw_masks(data, analysis: fxprune.Analysis, **options) -> dict[str, torch.Tensor]:
    """``masks_for``, then every recurrent layer direction keeps a unit (only more units are kept, so
    no value becomes empty): masks that empty one are a MaskError
    (test_masks_emptying_one_direction_are_a_mask_error)."""
    masks = data.draw(masks_for(analysis, **options), label="masks").masks
    units = producer_units(analysis)
    while empty := emptied_directions(analysis, group_votes(analysis, masks)):
        gi, u = units[empty[0]]
        keep_unit(analysis, masks, gi, int(u[data.draw(st.integers(0, len(u) - 1), label="kept unit")]))
    return masks


def kept_counter(analysis: fxprune.Analysis, keep: list[torch.Tensor]):
    """``kept(p)``: how many output channels producer ``p`` keeps."""
    units = producer_units(analysis)

    def kept(p: str) -> int:
        gi, u = units[p]
        return int(keep[gi][u].sum())

    return kept


def predicted_parameters(spec: SeqSpec, kept, gains_bias: set[str] = frozenset()) -> int:
    """The parameter count of the compacted model, from the spec and the kept output channels of
    each producer (``kept``), by the layers' own formulas.

    Each layer and direction of an RNN keeps its own hidden and projected units (a compacted
    nn.RNNBase whose widths differ becomes a RecurrentStack, without padding), except that an LSTM
    direction keeping at least as many projected as hidden units gets dead hidden units up to
    proj + 1 (nn.LSTM needs proj_size < hidden_size). A decoder tied to the embedding shares its
    weight.
    """
    total = 0

    def linear(s: LinearSpec, fin: int) -> int:
        fout = kept(s.name)
        return fout * fin + fout * (s.bias or s.name in gains_bias)

    def blocks(specs: tuple, w: int) -> int:
        nonlocal total
        for s in specs:
            if isinstance(s, LinearSpec):
                total += linear(s, w)
                w = kept(s.name)
            elif isinstance(s, Recurrent):
                gates, inp = GATES[s.mode], w
                for k in range(s.num_layers):
                    outputs = 0
                    for d in directions(s):
                        hidden = kept(f"{s.name}.hidden_l{k}{d}")
                        proj = kept(f"{s.name}.proj_l{k}{d}") if s.proj else 0
                        if proj >= hidden:
                            hidden = proj + 1
                        width = proj or hidden
                        total += gates * hidden * (inp + width) + 2 * gates * hidden * s.bias + proj * hidden
                        outputs += width
                    inp = outputs
                w = inp
            elif isinstance(s, Attention):
                inner = kept(f"{s.name}.heads") * (s.embed // s.heads)
                kdim = vdim = w
                if s.key is not None:
                    total += linear(s.key, w)
                    kdim = kept(s.key.name)
                if s.value is not None:
                    total += linear(s.value, w)
                    vdim = kept(s.value.name)
                fout = kept(s.name)
                total += inner * (w + kdim + vdim) + 3 * inner * s.bias + 2 * inner * s.add_bias_kv
                total += fout * inner + fout * s.bias
                w = fout
            elif isinstance(s, Residual):
                blocks(s.body, w)
                blocks(s.shortcut, w)
            # Act: no parameters
        return w

    stem = spec.stem
    if isinstance(stem, Embed):
        total += stem.vocab * kept(stem.name)
    else:
        total += linear(stem, stem.fin)
    w = blocks(spec.blocks, kept(stem.name))
    if spec.head is not None:
        total += linear(spec.head, w)
    if spec.decoder is not None:  # its weight is the embedding's
        total += kept(spec.decoder.name) * (spec.decoder.bias or spec.decoder.name in gains_bias)
    return total


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

@given(spec=sequence_specs(), data=st.data())
def test_compact_equals_apply_masks(spec, data):
    model, x, analysis = build(spec)
    masks = draw_masks(data, analysis)
    reference = fxprune.apply_masks(model, masks, x, analysis)
    small, _ = quiet_compact(model, masks, x, analysis)
    longer = dataclasses.replace(spec, n=spec.n + 1, t=spec.t + 2).input(2)
    for inp, what in ((x, "example input"), (spec.input(1), "second input"), (longer, "longer input of a larger batch")):
        assert_outputs_close(out(small.eval(), inp), out(reference.eval(), inp), f"compact vs apply_masks on the {what}")


@given(spec=sequence_specs(), data=st.data(), training=st.booleans())
def test_input_model_untouched_and_unshared(spec, data, training):
    model, x = spec.build()
    model.train(training)
    before = copy.deepcopy(model)
    flags = [(name, m.training) for name, m in model.named_modules()]
    analysis = fxprune.analyze(model, x)
    masks = draw_masks(data, analysis)
    masked = fxprune.apply_masks(model, masks, x, analysis)
    small, _ = quiet_compact(model, masks, x)  # analyses the model again
    assert [(name, m.training) for name, m in model.named_modules()] == flags, "training flags changed"
    after, expected = model.state_dict(keep_vars=True), before.state_dict(keep_vars=True)
    assert list(after) == list(expected)
    for k, v in expected.items():
        a = after[k]
        assert a.dtype == v.dtype and a.shape == v.shape and a.requires_grad == v.requires_grad, k
        bits = lambda t: t.detach().reshape(-1).view(torch.uint8)  # noqa: E731  (-0.0 and NaN payloads count)
        assert torch.equal(bits(a), bits(v)), f"{k} changed"
    if spec.decoder is not None:
        assert model.get_submodule(spec.decoder.name).weight is model.get_submodule(spec.stem.name).weight, "weights untied"
    for m in model.modules():
        if isinstance(m, nn.RNNBase):  # the weights the kernel runs with are still the parameters
            assert all(w is getattr(m, n) for w, n in zip(m._flat_weights, m._flat_weights_names))
    mine = storages(model)
    assert not (storages(small) & mine), "compact shares storage with the input model"
    assert not (storages(masked) & mine), "apply_masks shares storage with the input model"
    originals = {id(m) for m in model.modules()}
    assert not any(id(m) in originals for m in small.modules())
    # compact's modules run in the input model's mode: all but the plain containers that FX creates
    # for dotted names
    modes = {name: m.training for name, m in small.named_modules() if type(m) is not nn.Module}
    assert modes == {name: training for name in modes}, "compact changed the training mode"
    model.eval()
    torch.testing.assert_close(out(model, x), out(before.eval(), x), rtol=0, atol=0)


@given(spec=sequence_specs(), data=st.data())
def test_compact_parameter_count(spec, data):
    model, x, analysis = build(spec)
    masks = draw_masks(data, analysis)
    small, caught = quiet_compact(model, masks, x, analysis)
    report = small.meta["fxprune_report"]
    assert bool(caught) == any(a.action == "kept" for a in report), "compact warns exactly when it keeps masked channels"
    # A constant folded into a Linear without bias gives it one.
    gains_bias = {a.consumer for a in report if a.action == "folded"}
    kept = kept_counter(analysis, surviving_units(analysis, masks, report))
    got = sum(p.numel() for p in small.parameters())
    assert got == predicted_parameters(spec, kept, gains_bias), {k: tuple(v.shape) for k, v in state(small).items()}
    everything = [torch.ones(g.size, dtype=torch.bool) for g in analysis.groups]
    assert sum(p.numel() for p in model.parameters()) == predicted_parameters(spec, kept_counter(analysis, everything))


@given(spec=sequence_specs(), data=st.data())
def test_compact_composes(spec, data):
    """compact(compact(model, k1), k2) == apply_masks(model, k1 and k2), k2 removing one more unit.

    Stage one uses group-keyed masks only, so that each group's first-stage mask is one mask."""
    model, x, a1 = build(spec)
    k1 = draw_masks(data, a1, producer_keys=False)
    c1, _ = quiet_compact(model, k1, x, a1)
    keep1 = surviving_units(a1, k1, c1.meta["fxprune_report"])
    a2 = fxprune.analyze(c1, x)
    choices = [(gi, u) for gi, g in enumerate(a2.groups) if g.prunable and g.size > 1 for u in range(g.size)]
    assume(choices)
    gi2, u2 = data.draw(st.sampled_from(choices), label="unit removed by the second compaction")
    k2 = {a2.groups[gi2].name: torch.arange(a2.groups[gi2].size) != u2}
    assume(not emptied_tensors(a2, [k2.get(g.name, torch.ones(g.size, dtype=torch.bool)) for g in a2.groups]))

    # The original units behind unit u2: channel j of a producer of the compacted model is the j-th
    # surviving channel of the same producer in the original model (or a dead unit added to an LSTM direction).
    units1, units2 = producer_units(a1), producer_units(a2)
    combined = [v.clone() for v in group_votes(a1, k1)]
    for name, (g, u) in units2.items():
        if g != gi2 or not bool((u == u2).any()):
            continue
        g1, u1 = units1[name]
        survivors = u1[keep1[g1][u1]]
        for j in (u == u2).nonzero().flatten().tolist():
            if j < len(survivors):
                combined[g1][survivors[j]] = False
    assume(all(bool(m.any()) for m in combined) and not emptied_directions(a1, combined))
    masks = {g.name: m for g, m in zip(a1.groups, combined) if not bool(m.all())}

    c2, _ = quiet_compact(c1, k2, x, a2)
    reference = fxprune.apply_masks(model, masks, x, a1)
    for inp, what in ((x, "example input"), (spec.input(1), "second input")):
        assert_outputs_close(out(c2.eval(), inp), out(reference.eval(), inp),
                             f"compact(compact) vs combined masks on the {what}")


# --------------------------------------------------------------------------------------------
# Library bugs found by the properties above, as minimal deterministic regression cases.
# --------------------------------------------------------------------------------------------
class _BiGRUResidual(nn.Module):
    """y + fc(y) after a bidirectional GRU: fc's output couples both directions into one group."""

    def __init__(self):
        super().__init__()
        self.rnn, self.fc, self.head = nn.GRU(3, 2, bidirectional=True), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        y = self.rnn(x)[0]
        return self.head(y + self.fc(y))


@pytest.mark.parametrize("masks, kept", [
    ({"rnn.hidden_l0": torch.tensor([True, True, False, False])}, ("rnn.hidden_l0", 2, "rnn.hidden_l0_reverse")),
    ({"rnn.hidden_l0": torch.tensor([False, False])}, ("rnn.hidden_l0", 0, "rnn.hidden_l0")),  # the forward producer
], ids=["group-mask", "producer-mask"])
def test_masks_emptying_one_direction_keep_one_of_its_units(masks, kept):
    """Regression: keeping units of the group but none of one direction made nn.GRU's constructor
    raise a bare ValueError ('hidden_size must be greater than zero'), later a MaskError from compact.
    That direction now keeps one unit, zeroed, and compact reports it and stays exact."""
    torch.manual_seed(0)
    model, x = _BiGRUResidual().eval(), torch.randn(3, 2, 3)
    with pytest.warns(UserWarning, match="no other channel of that value survives the masks"):
        small = fxprune.compact(model, masks, x)
    assert [(a.group, a.channel, a.consumer) for a in small.meta["fxprune_report"]] == [kept]
    with torch.no_grad():
        torch.testing.assert_close(small(x), fxprune.apply_masks(model, masks, x)(x), rtol=1e-5, atol=1e-6)


def test_kept_unit_zeroed_inside_a_recurrent_stack():
    """Regression: a unit that the group keeps but a recurrent producer's own mask zeroes is masked
    inside the RNN; when the compacted RNN was a RecurrentStack (here the directions keep 2 and 1
    units), compact raised CompactError "cannot mask units inside module 'rnn': it has no parameter
    'weight_ih_l0'"."""
    torch.manual_seed(0)
    model, x = _BiGRUResidual().eval(), torch.randn(3, 2, 3)
    # forward unit 1: kept (fc keeps it) but zeroed by the GRU; reverse unit 1: removed
    masks = {"rnn.hidden_l0": torch.tensor([True, False]), "fc": torch.tensor([True, True, True, False])}
    small, _ = quiet_compact(model, masks, x)
    assert any(isinstance(m, RecurrentStack) for m in small.modules())
    assert_outputs_close(out(small, x), out(fxprune.apply_masks(model, masks, x), x), "compact vs apply_masks")


class _StackedGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 2, num_layers=2, dropout=0.5), nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def test_recurrent_stack_keeps_the_training_mode():
    """Regression: the stack came back in training mode, so dropout between its layers was on."""
    torch.manual_seed(0)
    model, x = _StackedGRU().eval(), torch.randn(3, 2, 3)
    masks = {"rnn.hidden_l0": torch.tensor([True, False])}
    small, _ = quiet_compact(model, masks, x)
    assert [name for name, m in small.named_modules() if m.training] == []
    assert_outputs_close(out(small, x), out(fxprune.apply_masks(model, masks, x), x), "compact vs apply_masks")
