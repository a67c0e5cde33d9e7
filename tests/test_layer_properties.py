"""Property tests for layer removal, growth and optimizer remapping on random architectures.

Architectures come from ``model_specs()`` (random CNNs) and ``sequence_specs()`` (RNN, attention
and Linear blocks) in tests/strategies.py, and from ``residual_model_specs()`` and
``residual_sequence_specs()`` below, which draw identity residual blocks (removable layers) in most
places. The properties:

* removing a random subset of ``analysis.layers`` together with random channel masks: compact
  equals apply_masks;
* growing random prunable groups (n new channels) and inserting residual blocks after random
  layers keeps the function, for both inits;
* growing then compacting back to the original channels and layers (init="random") gives the
  original model: same outputs, same parameter names and shapes;
* an optimizer remapped onto the compact model takes the same step as the one over the masked
  reference (SGD with momentum, Adam, AdamW; eval mode, so that BatchNorm adds no float noise).

Each property runs CNN_EXAMPLES (or SEQ_EXAMPLES) examples whatever the profile.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.modules.recurrent import RecurrentStack
from strategies import (Embed, ModelSpec, Residual, SeqSpec, _attention, _Builder, _head_counts, _seq_block, masks_for,
                        model_specs, sequence_specs)
from strategies import Linear as LinearSpec
from test_properties import assert_outputs_close, build, out, quiet_compact
from test_sequence_properties import build as build_sequence
from test_sequence_properties import draw_masks as draw_sequence_masks

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

CNN_EXAMPLES = 30
SEQ_EXAMPLES = 15


# --------------------------------------------------------------------------------------------
# Strategies: architectures rich in removable layers (model_specs() rarely draws an identity
# residual; these draw one in most blocks, often several in a row)
# --------------------------------------------------------------------------------------------

@st.composite
def residual_model_specs(draw, max_blocks: int = 4) -> ModelSpec:
    """A random CNN whose blocks are mostly identity residuals ``x + body(x)``, between random
    blocks of ``model_specs()``."""
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 4))
    h, w = draw(st.integers(4, 10)), draw(st.integers(4, 10))
    b = _Builder(draw, n)
    blocks, (cc, hh, ww) = [], (c, h, w)
    if b.flag(0.8):
        specs, hh, ww = b.conv(cc, b.channels(2), hh, ww, same=b.flag())
        blocks += specs
        cc = specs[0].cout
    for i in range(draw(st.integers(1, max_blocks))):
        b.prefix = f"s{i}." if b.flag(0.5) else ""
        kind = b.pick(("identity", "identity", "residual", "block"))
        if kind == "identity":
            outer = b.prefix
            b.prefix = f"{outer}res{b.count}."
            body, _, _ = b.body(cc, cc, hh, ww, 1)
            b.prefix = outer
            blocks.append(Residual(body, (), b.flag()))
        else:
            specs, cc, hh, ww = (b.residual(cc, hh, ww, 1, same=True) if kind == "residual"
                                 else b.block(cc, hh, ww, 1, same=False))
            blocks += specs
    if b.flag(0.9):
        b.prefix = "head." if b.flag(0.5) else ""
        head, out_shape = b.head(cc, hh, ww)
        blocks.append(head)
    else:
        out_shape = (n, cc, hh, ww)
    return ModelSpec(tuple(blocks), n, c, h, w, draw(st.integers(0, 2**31 - 1)), out_shape)


@st.composite
def residual_sequence_specs(draw, max_blocks: int = 3) -> SeqSpec:
    """A random sequence model (as ``sequence_specs()``) whose blocks are mostly residual
    self-attention or feed-forward blocks."""
    b = _Builder(draw, 2)
    batch_first, t = b.flag(), b.ints(3, 5)
    dim = b.pick((4, 6, 8, 12))
    if b.flag(0.7):
        stem = Embed(b.name("emb"), b.ints(5, 12), dim)
    else:
        stem = LinearSpec(b.name("inp"), b.ints(1, 6), dim, b.flag(0.8))
    w, blocks = dim, []
    for i in range(b.ints(1, max_blocks)):
        b.prefix = f"s{i}." if b.flag(0.4) else ""
        kind = b.pick(("attention", "feed-forward", "block"))
        if kind == "block":
            specs, w = _seq_block(b, w, batch_first)
            blocks += specs
            continue
        if not _head_counts(w):  # project to a width with heads
            fc = LinearSpec(b.name("fc"), w, b.pick((4, 6, 8, 12)), b.flag(0.8))
            blocks.append(fc)
            w = fc.fout
        if kind == "attention":
            body = (_attention(b, w, batch_first, b.pick(_head_counts(w))),)
        else:
            hidden = b.ints(2, 12)
            body = (LinearSpec(b.name("fc"), w, hidden, b.flag(0.8)), b.act(("relu", "gelu", "tanh")),
                    LinearSpec(b.name("fc"), hidden, w, b.flag(0.8)))
        blocks.append(Residual(body, (), b.flag()))
    b.prefix = "head." if b.flag(0.3) else ""
    head = LinearSpec(b.name("fc"), w, b.ints(1, 6), b.flag(0.8))
    return SeqSpec(stem, tuple(blocks), head, None, 2, t, batch_first, draw(st.integers(0, 2**31 - 1)))


CNNS = st.one_of(residual_model_specs(), model_specs())
SEQUENCES = st.one_of(residual_sequence_specs(), sequence_specs())


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

class Scale(nn.Module):
    """A shape-preserving branch with a parameter, for ``insert={layer: Scale()}``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        return torch.tanh(x) * self.w


def draw_layers_removed(data, analysis: fxprune.Analysis) -> dict[str, bool]:
    """A random subset of the removable layers, as masks that remove them (in the drawn order)."""
    if not analysis.layers:
        return {}
    chosen = data.draw(st.lists(st.sampled_from([layer.name for layer in analysis.layers]), unique=True),
                       label="removed layers")
    return {name: False for name in chosen}


def draw_growth(data, analysis: fxprune.Analysis, templates=("copy", "module")):
    """Random widening of prunable groups of two or more channels, and random inserts."""
    growable = [g.name for g in analysis.groups if g.prunable and g.size >= 2]
    widen = {}
    if growable:
        for name in data.draw(st.lists(st.sampled_from(growable), unique=True, max_size=4), label="widened groups"):
            widen[name] = data.draw(st.integers(1, 3), label=f"new channels of {name}")
    if growable and not widen and (not analysis.layers or data.draw(st.booleans(), label="widen at least one")):
        widen[growable[0]] = 1
    insert = {}
    if analysis.layers:
        for name in data.draw(st.lists(st.sampled_from([layer.name for layer in analysis.layers]), unique=True,
                                       max_size=3), label="layers to insert after"):
            kind = data.draw(st.sampled_from(templates), label=f"template after {name}")
            insert[name] = "copy" if kind == "copy" else Scale()
    if analysis.layers and not widen and not insert:
        insert[analysis.layers[0].name] = "copy"
    return widen, insert


def grow_or_refuse(model, x, analysis, widen, insert, init):
    """``fxprune.grow``; a layout that cannot grow (a GrowError "cannot widen group ...") rejects the
    example."""
    try:
        return fxprune.grow(model, x, widen=widen, insert=insert, init=init, analysis=analysis)
    except fxprune.GrowError as e:
        assume("cannot widen" not in str(e))
        raise


def layer_parameters(gm: torch.fx.GraphModule, layer: fxprune.Layer) -> set[str]:
    """The qualified names of the parameters that the nodes of ``layer`` use."""
    nodes = {n.name: n for n in gm.graph.nodes}
    names = set()
    for node_name in layer.nodes:
        n = nodes[node_name]
        if n.op == "call_module":
            names |= {f"{n.target}.{p}" for p, _ in gm.get_submodule(n.target).named_parameters()}
        elif n.op == "get_attr":
            names.add(n.target)
    return names


def new_units(analysis: fxprune.Analysis, mapping) -> dict[str, torch.Tensor]:
    """Per group of a grown model's analysis: which units are new, read from the mapping (a unit
    is new where its entries in the group's tensors are new; every tensor must agree)."""
    out = {}
    for g in analysis.groups:
        new = None
        for m in g.members:
            if m.kind != "param" or mapping[m.name].source is None or m.dim not in mapping[m.name].index:
                continue
            entry = mapping[m.name].index[m.dim][m.index] < 0
            here = torch.zeros(g.size, dtype=torch.bool).index_put_((m.unit,), entry, accumulate=True)
            seen = torch.zeros(g.size, dtype=torch.bool)
            seen[m.unit] = True
            new = here if new is None else new
            assert torch.equal(new[seen], here[seen]), f"'{m.name}' disagrees on the new units of '{g.name}'"
        if new is not None and bool(new.any()):
            out[g.name] = new
    return out


def round_trip_masks(grown: torch.fx.GraphModule, mapping, x, widen: dict[str, int]) -> dict:
    """Masks on the grown model keeping exactly the original channels (the new units, read from the
    mapping, are the last ones of each group) and removing the inserted layers."""
    analysis = fxprune.analyze(grown, x)
    names = [layer.name for layer in analysis.layers]
    assert len(set(names)) == len(names), f"layer names of the grown model repeat: {names}"
    masks = {name: ~new for name, new in new_units(analysis, mapping).items()}
    for name, n in widen.items():
        # the new units come last; an LSTM whose projection grows past its hidden units gets more
        # hidden units than asked for (that stay zero), so a group may have more than n new ones
        size, k = analysis.group(name).size, int((~masks[name]).sum())
        assert k >= n and torch.equal(masks[name], torch.arange(size) < size - k), \
            f"the new units of '{name}' are not its last ones: {(~masks[name]).int().tolist()}"
    new_parameters = {name for name, tm in mapping.items() if tm.source is None}
    for layer in analysis.layers:
        used = layer_parameters(analysis.gm, layer)
        if used & new_parameters:
            assert used <= new_parameters, f"layer '{layer.name}' mixes old and new parameters"
            masks[layer.name] = False
    removed = set().union(*(layer_parameters(analysis.gm, analysis.layer(k)) for k, v in masks.items() if v is False))
    assert removed == new_parameters & {n for n, _ in grown.named_parameters()}, \
        "the inserted blocks are not all removable layers of the grown model"
    return masks


# --------------------------------------------------------------------------------------------
# (a) removal is exact
# --------------------------------------------------------------------------------------------

@settings(max_examples=CNN_EXAMPLES)
@given(spec=CNNS, data=st.data())
def test_layer_removal_with_channel_masks_equals_apply_masks(spec, data):
    model, x, analysis = build(spec)
    masks = dict(data.draw(masks_for(analysis), label="channel masks").masks)
    masks.update(draw_layers_removed(data, analysis))
    reference = fxprune.apply_masks(model, masks, x, analysis)
    small, _ = quiet_compact(model, masks, x, analysis)
    for inp, what in ((x, "example input"), (spec.input(1), "second input")):
        assert_outputs_close(out(small, inp), out(reference, inp), f"compact vs apply_masks on the {what}")
    removed = [analysis.layer(k) for k, v in masks.items() if v is False]
    names = {n for n, _ in small.named_parameters()}
    for layer in removed:
        assert not (layer_parameters(analysis.gm, layer) & names), f"parameters of removed layer {layer.name} remain"


@settings(max_examples=SEQ_EXAMPLES)
@given(spec=SEQUENCES, data=st.data())
def test_layer_removal_on_sequence_models(spec, data):
    model, x, analysis = build_sequence(spec)
    masks = dict(draw_sequence_masks(data, analysis))
    masks.update(draw_layers_removed(data, analysis))
    reference = fxprune.apply_masks(model, masks, x, analysis).eval()
    small, _ = quiet_compact(model, masks, x, analysis)
    for inp, what in ((x, "example input"), (spec.input(1), "second input")):
        assert_outputs_close(out(small.eval(), inp), out(reference, inp), f"compact vs apply_masks on the {what}")


# --------------------------------------------------------------------------------------------
# (b) growth keeps the function
# --------------------------------------------------------------------------------------------

@settings(max_examples=CNN_EXAMPLES)
@given(spec=CNNS, data=st.data(), init=st.sampled_from(("random", "split")))
def test_growth_keeps_the_function(spec, data, init):
    model, x, analysis = build(spec)
    widen, insert = draw_growth(data, analysis)
    assume(widen or insert)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grown, mapping = grow_or_refuse(model, x, analysis, widen, insert, init)
    for inp, what in ((x, "example input"), (spec.input(1), "second input")):
        assert_outputs_close(out(grown, inp), out(model, inp), f"grown ({init}) vs model on the {what}")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "grow changed the model"
    params = dict(grown.named_parameters())
    assert set(params) <= set(mapping)
    for name, n in widen.items():  # the tensors holding a widened group's last channel got n more after it
        g = analysis.group(name)
        for m in g.members:
            if m.kind == "param" and m.name in params and bool((m.unit == g.size - 1).any()):
                idx = mapping[m.name].index.get(m.dim)
                assert idx is not None and int((idx < 0).sum()) >= n, f"{m} of group '{name}' did not grow"
                assert params[m.name].shape[m.dim] == len(idx)


@settings(max_examples=SEQ_EXAMPLES)
@given(spec=SEQUENCES, data=st.data(), init=st.sampled_from(("random", "split")))
def test_growth_keeps_the_function_of_sequence_models(spec, data, init):
    model, x, analysis = build_sequence(spec)
    widen, insert = draw_growth(data, analysis)
    assume(widen or insert)
    grown, _ = grow_or_refuse(model, x, analysis, widen, insert, init)
    for inp, what in ((x, "example input"), (spec.input(1), "second input")):
        assert_outputs_close(out(grown.eval(), inp), out(model, inp), f"grown ({init}) vs model on the {what}")


# --------------------------------------------------------------------------------------------
# (c) grow, then compact back
# --------------------------------------------------------------------------------------------

def check_round_trip(model, x, analysis, widen, insert, inputs):
    grown, mapping = grow_or_refuse(model, x, analysis, widen, insert, "random")
    masks = round_trip_masks(grown, mapping, x, widen)
    back, _ = quiet_compact(grown, masks, x)
    for inp, what in inputs:
        assert_outputs_close(out(back.eval(), inp), out(model, inp), f"compact(grow(model)) vs model on the {what}")
    # compact keeps a masked channel (zeroed) where it carries a value that it cannot fold; it folds
    # a constant into its consumer's bias, creating one where there was none: here only new channels
    # can be involved, and their readers' weights are zero
    report = back.meta["fxprune_report"]
    for a in report:
        assert a.channel >= analysis.group(a.group).size, f"compact adjusted an old channel: {a}"
    original = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    params = dict(back.named_parameters(remove_duplicate=False))
    created = {f"{a.consumer}.bias" for a in report if a.action == "folded"} - set(original)
    for name in created:
        assert not params[name].detach().any(), f"{name} folds a non-zero constant"
    got = {n: tuple(p.shape) for n, p in params.items() if n not in created}
    if any(isinstance(m, RecurrentStack) for m in back.modules()):
        # an RNN grown to layers of different widths became a RecurrentStack, which stays one
        # (its parameters are renamed): compare the shapes only
        assert sorted(got.values()) == sorted(original.values())
    elif any(a.action == "kept" for a in report):
        assert set(got) == set(original)
    else:
        assert got == original


@settings(max_examples=CNN_EXAMPLES)
@given(spec=CNNS, data=st.data())
def test_grow_then_compact_gives_back_the_model(spec, data):
    model, x, analysis = build(spec)
    widen, insert = draw_growth(data, analysis)
    assume(widen or insert)
    check_round_trip(model, x, analysis, widen, insert, ((x, "example input"), (spec.input(1), "second input")))


@settings(max_examples=SEQ_EXAMPLES)
@given(spec=SEQUENCES, data=st.data())
def test_grow_then_compact_gives_back_sequence_models(spec, data):
    model, x, analysis = build_sequence(spec)
    widen, insert = draw_growth(data, analysis)
    assume(widen or insert)
    check_round_trip(model, x, analysis, widen, insert, ((x, "example input"), (spec.input(1), "second input")))


# --------------------------------------------------------------------------------------------
# (d) the remapped optimizer takes the same step
# --------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd-momentum": lambda params, wd: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=wd),
    "adam": lambda params, wd: torch.optim.Adam(params, lr=1e-2, weight_decay=wd),
    "adamw": lambda params, wd: torch.optim.AdamW(params, lr=1e-2, weight_decay=wd or 0.05),
}


def loss_of(model, x):
    y = model(x.clone())
    return (y - 0.3).square().mean()


def backward_or_reject(model, x):
    """``loss.backward()``; a model whose own in-place activations break autograd is rejected."""
    try:
        loss_of(model, x).backward()
    except RuntimeError as e:
        assume("inplace" not in str(e))
        raise


@settings(max_examples=CNN_EXAMPLES)
@given(spec=CNNS, data=st.data(), which=st.sampled_from(sorted(OPTIMIZERS)),
       weight_decay=st.sampled_from((0.0, 1e-2)))
def test_remapped_optimizer_takes_the_same_step(spec, data, which, weight_decay):
    model, x, analysis = build(spec)
    assume(any(True for _ in model.parameters()))  # an optimizer needs something to train
    masks = dict(data.draw(masks_for(analysis), label="channel masks").masks)
    masks.update(draw_layers_removed(data, analysis))
    reference = fxprune.apply_masks(model, masks, x, analysis).eval()
    optimizer = OPTIMIZERS[which](reference.parameters(), weight_decay)
    x2 = spec.input(1)
    for batch in (x, x2):
        optimizer.zero_grad()
        backward_or_reject(reference, batch)
        optimizer.step()
    trained = copy.deepcopy(model)
    trained.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.endswith("_channel_mask")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, mapping = fxprune.compact(trained, masks, x, return_mapping=True)
    small.eval()
    folded = {f"{a.consumer}.bias" for a in small.meta["fxprune_report"] if a.action == "folded"}
    # the expected step: the reference optimizer on an independent copy of the reference (the new
    # optimizer must not share state with the old one: test_optim.py checks that separately)
    expected_model, expected_opt = copy.deepcopy((reference, optimizer))
    remapped = fxprune.remap_optimizer(optimizer, reference, small, mapping)
    start = {n: p.detach().clone() for n, p in small.named_parameters()}
    ref_start = {n: p.detach().clone() for n, p in expected_model.named_parameters()}
    for opt, net in ((remapped, small), (expected_opt, expected_model)):
        opt.zero_grad()
        loss_of(net, x).backward()
        opt.step()
    ref_after = dict(expected_model.named_parameters())
    decays = weight_decay > 0 or which == "adamw"
    for name, p in small.named_parameters():
        m = mapping[name]
        if m.source is None:  # a bias that folding gave a consumer without one
            assert name in folded, f"{name} is new"
            continue
        if name in folded:  # its bias holds a folded constant, so only the update compares (without decay)
            if decays:
                continue
        else:
            assert_outputs_close(p.detach(), m.carry(ref_after[m.source], p.shape), f"{which}: {name} after the step")
        want = m.carry(ref_after[m.source], p.shape) - m.carry(ref_start[m.source], p.shape)
        got = p.detach() - start[name]
        scale = max(float(want.abs().max()), 1e-3)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale,
                                   msg=lambda msg, name=name: f"{which}: the update of {name} differs: {msg}")
