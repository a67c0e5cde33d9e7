"""Property tests: compact == apply_masks on random architectures and random masks.

Architectures and masks come from tests/strategies.py (which also registers the Hypothesis
profiles: FXPRUNE_HYPOTHESIS_PROFILE=ci (default) or large).
"""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from strategies import ModelSpec, emptied_tensors, group_votes, masks_for, model_specs, producer_units

RTOL = 1e-5


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def assert_outputs_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Max error below RTOL relative to the output's magnitude (at least 1)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(expected).all(), f"{what}: reference output is not finite"
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * scale, msg=lambda m: f"{what}: {m}")


def out(model, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` without autograd, on a copy of ``x`` (a model may modify its input in place)."""
    with torch.no_grad():
        return model(x.clone())


def quiet_compact(model, masks, x, analysis=None) -> tuple[torch.fx.GraphModule, list[warnings.WarningMessage]]:
    """``fxprune.compact``, returning the warnings it raised instead of letting them through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fxprune.compact(model, masks, x, analysis)
    return result, [w for w in caught if "fxprune" in str(w.message)]


def build(spec: ModelSpec) -> tuple[nn.Module, torch.Tensor, fxprune.Analysis]:
    model, x = spec.build()
    assert tuple(out(model, x).shape) == spec.out_shape, "the generator's shape bookkeeping is wrong"
    return model, x, fxprune.analyze(model, x)


def surviving_units(analysis: fxprune.Analysis, masks: dict, report: list) -> list[torch.Tensor]:
    """``group_votes`` plus the units that compact reports as kept."""
    keep = [v.clone() for v in group_votes(analysis, masks)]
    index = {g.name: i for i, g in enumerate(analysis.groups)}
    for adj in report:
        if adj.action == "kept":
            keep[index[adj.group]][adj.channel] = True
    return keep


def expected_shapes(model: nn.Module, analysis: fxprune.Analysis, keep: list[torch.Tensor]) -> dict[str, tuple]:
    """The shape of every parameter and buffer of ``model`` after removing the dropped units,
    from the analysis' "param" members (index ``index[i]`` along ``dim`` is unit ``unit[i]``)."""
    removed: dict[str, dict[int, set[int]]] = {}
    for gi, g in enumerate(analysis.groups):
        for m in g.members:
            if m.kind != "param":
                continue
            gone = m.index[~keep[gi][m.unit]].tolist()
            removed.setdefault(m.name, {}).setdefault(m.dim, set()).update(gone)
    shapes = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        shape = list(t.shape)
        for dim, gone in removed.get(name, {}).items():
            shape[dim] -= len(gone)
        shapes[name] = tuple(shape)
    return shapes


def producer_masks(analysis: fxprune.Analysis, masks: dict) -> dict[str, torch.Tensor]:
    """The channels each module producer zeroes under ``masks`` (its own mask if keyed by it,
    else its group's mask, else its units' votes)."""
    groups = {g.name: i for i, g in enumerate(analysis.groups)}
    votes = group_votes(analysis, masks)
    is_group = {k: k in groups and len(m) == analysis.groups[groups[k]].size for k, m in masks.items()}
    by_group = {groups[k]: m for k, m in masks.items() if is_group[k]}
    own = {k: m for k, m in masks.items() if not is_group[k]}
    units = producer_units(analysis)
    zeroed = {}
    for p in analysis.space.producers:
        if p.kind != "module":
            continue
        gi, u = units[p.name]
        if p.name in own:
            zeroed[p.name] = own[p.name]
        elif gi in by_group:
            zeroed[p.name] = by_group[gi][u]
        else:
            zeroed[p.name] = votes[gi][u]
    return zeroed


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in list(model.named_parameters()) + list(model.named_buffers())}


def storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in state(model).values() if t.numel() > 0}


def draw_case(data, spec: ModelSpec, **mask_options):
    model, x, analysis = build(spec)
    drawn = data.draw(masks_for(analysis, **mask_options), label="masks")
    return model, x, analysis, drawn.masks


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

@given(spec=model_specs(), data=st.data())
def test_compact_equals_apply_masks(spec, data):
    model, x, analysis, masks = draw_case(data, spec)
    reference = fxprune.apply_masks(model, masks, x)
    small, _ = quiet_compact(model, masks, x)
    x2 = spec.input(1)
    for inp, what in ((x, "example input"), (x2, "second input")):
        assert_outputs_close(out(small, inp), out(reference, inp), f"compact vs apply_masks on the {what}")


@given(spec=model_specs())
def test_trivial_masks_change_nothing(spec):
    model, x, analysis = build(spec)
    masks = {g.name: torch.ones(g.size, dtype=torch.bool) for g in analysis.groups}
    small, caught = quiet_compact(model, masks, x)
    assert caught == [] and small.meta["fxprune_report"] == []
    assert {k: tuple(v.shape) for k, v in state(small).items()} == {k: tuple(v.shape) for k, v in state(model).items()}
    expected = out(model, x)
    assert_outputs_close(out(fxprune.apply_masks(model, masks, x), x), expected, "apply_masks(all kept) vs model")
    assert_outputs_close(out(small, x), expected, "compact(all kept) vs model")


@given(spec=model_specs(), data=st.data())
def test_compact_parameter_count(spec, data):
    model, x, analysis, masks = draw_case(data, spec)
    small, caught = quiet_compact(model, masks, x)
    report = small.meta["fxprune_report"]
    kept = [a for a in report if a.action == "kept"]
    assert bool(caught) == bool(kept), "compact warns exactly when it keeps masked channels"

    keep = surviving_units(analysis, masks, report)
    expected = expected_shapes(model, analysis, keep)
    # A constant folded into a consumer without bias gives that consumer a new bias.
    for a in report:
        if a.action == "folded":
            consumer = model.get_submodule(a.consumer)
            if consumer.bias is None:
                out_dim = 1 if getattr(consumer, "transposed", False) else 0
                expected[f"{a.consumer}.bias"] = (expected[f"{a.consumer}.weight"][out_dim],)

    got = {k: tuple(v.shape) for k, v in state(small).items() if not k.endswith("_channel_mask")}
    assert got == expected
    params = dict(small.named_parameters())
    assert set(params) <= set(expected)
    assert sum(p.numel() for p in params.values()) == sum(torch.Size(expected[k]).numel() for k in params)


@given(spec=model_specs(), data=st.data())
def test_input_model_untouched_and_unshared(spec, data):
    model, x, analysis, masks = draw_case(data, spec)
    before = {k: v.detach().clone() for k, v in state(model).items()}
    x0 = x.clone()  # the model may change its input in place when compact probes it
    y_before = out(model, x0)
    fxprune.analyze(model, x)
    masked = fxprune.apply_masks(model, masks, x)
    small, _ = quiet_compact(model, masks, x)
    after = state(model)
    assert set(after) == set(before)
    for k, v in before.items():
        a = after[k]
        assert a.dtype == v.dtype and a.shape == v.shape, k
        # bitwise: compare the raw bytes, so that -0.0 / NaN payloads count too
        assert torch.equal(a.detach().reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), f"{k} changed"
    assert not model.training
    assert torch.equal(out(model, x0), y_before)
    mine = storages(model)
    assert not (storages(small) & mine), "compact shares storage with the input model"
    assert not (storages(masked) & mine), "apply_masks shares storage with the input model"
    originals = {id(m) for m in model.modules()}
    assert not any(id(m) in originals for m in small.modules())
    assert not any(id(m) in originals for m in masked.modules())


@given(spec=model_specs(), data=st.data())
def test_masks_keeping_a_unit_of_every_group_are_exact(spec, data):
    """Masks drawn without avoiding values that lose every channel (a split piece, a producer that
    covers part of its group): compact never refuses masks that keep a unit of every group. It keeps
    and reports one unit of each such value, zeroed, and equals apply_masks."""
    model, x, analysis = build(spec)
    masks = data.draw(masks_for(analysis, avoid_empty=False), label="masks").masks
    reference = fxprune.apply_masks(model, masks, x, analysis)
    small, caught = quiet_compact(model, masks, x, analysis)
    report = small.meta["fxprune_report"]
    assert bool(caught) == any(a.action == "kept" for a in report)
    assert emptied_tensors(analysis, surviving_units(analysis, masks, report)) == []
    for inp, what in ((x, "example input"), (spec.input(1), "second input")):
        assert_outputs_close(out(small, inp), out(reference, inp), f"compact vs apply_masks on the {what}")


@given(spec=model_specs(), data=st.data())
def test_invalid_masks_are_rejected(spec, data):
    model, x, analysis = build(spec)
    bad = []
    inside = {name for layer in analysis.layers for name in layer.groups}
    prunable = [g for g in analysis.groups if g.prunable and g.name not in inside]
    if prunable:  # emptying a group that lives in no removable layer
        g = data.draw(st.sampled_from(prunable), label="emptied group")
        bad.append({g.name: torch.zeros(g.size, dtype=torch.bool)})
    blocked = [g for g in analysis.groups if not g.prunable]
    if blocked:  # a group that is not prunable keeps every channel
        g = data.draw(st.sampled_from(blocked), label="blocked group")
        m = torch.ones(g.size, dtype=torch.bool)
        m[data.draw(st.integers(0, g.size - 1), label="removed channel")] = False
        bad.append({g.name: m})
    bad.append({"no_such_module": torch.ones(3, dtype=torch.bool)})
    if analysis.groups:
        g = data.draw(st.sampled_from(analysis.groups), label="group")
        n = g.size + 1
        while len(producer_units(analysis).get(g.name, (0, ()))[1]) == n:  # a producer of that name and size
            n += 1
        bad += [
            {g.name: torch.ones(n, dtype=torch.bool)},  # wrong length
            {g.name: torch.ones(g.size, dtype=torch.int64)},  # wrong dtype
            {g.name: torch.ones(1, g.size, dtype=torch.bool)},  # wrong rank
        ]
    for masks in bad:
        with pytest.raises(fxprune.MaskError):
            fxprune.apply_masks(model, masks, x, analysis)
        with pytest.raises(fxprune.MaskError):
            quiet_compact(model, masks, x, analysis)


# No "computed" shuffles: a first compaction can leave one channel per group for the second, which
# compact gets wrong there (test_computed_channel_shuffle).
@given(spec=model_specs(shuffle_styles=("literal", "module", "functional")), data=st.data())
def test_compact_composes(spec, data):
    model, x, a1, k1 = draw_case(data, spec)
    c1, _ = quiet_compact(model, k1, x)
    keep1 = surviving_units(a1, k1, c1.meta["fxprune_report"])
    a2 = fxprune.analyze(c1, x)
    k2 = data.draw(masks_for(a2, producer_keys=False), label="masks of the compact model").masks
    c2, _ = quiet_compact(c1, k2, x)

    # Combined masks on the original model, one per module producer: stage 1 zeroes eff1; of
    # the surviving channels, stage 2 zeroes eff2.
    units1 = producer_units(a1)
    eff1, eff2 = producer_masks(a1, k1), producer_masks(a2, k2)
    combined = {}
    for name, m1 in eff1.items():
        gi, u = units1[name]
        survive = keep1[gi][u]
        assert int(survive.sum()) == len(eff2[name]), f"producer {name} has the wrong size after compact"
        m = m1.clone()
        m[survive] &= eff2[name]
        combined[name] = m
    for gi, g in enumerate(a1.groups):
        alive = torch.zeros(g.size, dtype=torch.bool)
        for name, m in combined.items():
            if units1[name][0] == gi:
                alive[units1[name][1][m]] = True
        assume(bool(alive.any()))  # otherwise a whole group is zero: not expressible as masks
    reference = fxprune.apply_masks(model, combined, x)
    for inp, what in ((x, "example input"), (spec.input(1), "second input")):
        assert_outputs_close(out(c2, inp), out(reference, inp), f"compact(compact) vs combined masks on the {what}")


# --------------------------------------------------------------------------------------------
# Known library bugs found by the properties above, as minimal deterministic cases (and a few
# regression cases for bugs already fixed). The strategies avoid the open ones
# (the "computed" shuffle only with channels > groups and not after another shuffle); remove
# those restrictions when they pass.
# --------------------------------------------------------------------------------------------

class _CatPlusAdd(nn.Module):
    """cat([a(x), b(x)]) + c(x): one group of 4 units; producers a and b each cover half of it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], 1) + self.c(x))


class _Slice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(2, 5)

    def forward(self, x):
        return self.fc(self.a(x)[:, 1:3].mean((2, 3)))


class _SplitPieces(nn.Module):
    def __init__(self, sizes=(2, 2)):
        super().__init__()
        self.sizes = list(sizes)
        self.a, self.b, self.c = nn.Conv2d(3, sum(sizes), 1), nn.Conv2d(sizes[0], 3, 1), nn.Conv2d(sizes[1], 3, 1)

    def forward(self, x):
        p, q = torch.split(self.a(x), self.sizes, 1)
        return self.b(p) + self.c(q)


def _check_compact_or_mask_error(model, masks, x):
    """compact either equals apply_masks or refuses the masks with a MaskError."""
    reference = fxprune.apply_masks(model, masks, x)
    try:
        small, _ = quiet_compact(model, masks, x)
    except fxprune.MaskError:
        return
    assert_outputs_close(out(small, x), out(reference, x), "compact vs apply_masks")


def test_all_true_producer_mask_changes_nothing():
    """Regression: a producer-keyed mask voted False for every unit of its group that the producer
    does not cover, so an all-True mask for 'a' zeroed all of b's channels and compact failed."""
    torch.manual_seed(0)
    model, x = _CatPlusAdd().eval(), torch.randn(1, 3, 5, 5)
    masks = {"a": torch.ones(2, dtype=torch.bool)}
    assert_outputs_close(out(fxprune.apply_masks(model, masks, x), x), out(model, x), "apply_masks(all kept) vs model")
    assert_outputs_close(out(quiet_compact(model, masks, x)[0], x), out(model, x), "compact(all kept) vs model")


@pytest.mark.parametrize("make, masks, unit", [
    pytest.param(_Slice, {"a": torch.tensor([True, False, False, True])}, 1, id="slice-emptied"),
    pytest.param(_CatPlusAdd, {"a": torch.tensor([True, True, False, False])}, 2, id="producer-b-emptied"),
    pytest.param(_SplitPieces, {"a": torch.tensor([True, True, False, False])}, 2, id="split-piece-emptied"),
    pytest.param(lambda: _SplitPieces((2, 1)), {"a": torch.tensor([True, True, False])}, 2, id="one-channel-piece-emptied"),
])
def test_emptying_a_value_keeps_one_of_its_units(make, masks, unit):
    """Regression: masks that keep part of a group but remove every channel of one value (a
    producer covering part of the group, a split piece) made compact build 0-channel convs and fail
    with RuntimeError / CompactError, later a MaskError. The value now keeps one unit, zeroed."""
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(2, 3, 5, 5)
    small, caught = quiet_compact(model, masks, x)
    assert [(a.group, a.channel, a.action) for a in small.meta["fxprune_report"]] == [("a", unit, "kept")]
    assert len(caught) == 1 and "no other channel of that value survives the masks" in str(caught[0].message)
    assert_outputs_close(out(small, x), out(fxprune.apply_masks(model, masks, x), x), "compact vs apply_masks")


class _SigmoidPieces(nn.Module):
    """sigmoid(a(x)) split in two: a transposed conv (no bias can take a constant) reads one piece."""

    def __init__(self):
        super().__init__()
        self.a, self.t, self.c = nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(2, 3, 3), nn.Conv2d(2, 3, 1)

    def forward(self, x):
        p, q = torch.sigmoid(self.a(x)).chunk(2, 1)
        return self.t(p).mean((2, 3)) + self.c(q).mean((2, 3))


def test_every_dropped_channel_is_measured():
    """Regression: masks emptying piece p kept its unit 0; unit 1, 0.5 at t, was kept as well, and
    the plan made again without unit 0 (p no longer empty) dropped it unmeasured: its 0.5 was lost."""
    torch.manual_seed(0)
    model, x = _SigmoidPieces().eval(), torch.randn(2, 3, 5, 5)
    masks = {"a": torch.tensor([False, False, True, True])}
    small, _ = quiet_compact(model, masks, x)
    assert [(a.channel, a.consumer, a.action) for a in small.meta["fxprune_report"]] == [(1, "t", "kept"), (0, "chunk[0]", "kept")]
    assert_outputs_close(out(small, x), out(fxprune.apply_masks(model, masks, x), x), "compact vs apply_masks")


class _ShuffleStages(nn.Module):
    """ShuffleNet V2's stride-1 blocks: ``x1, x2 = x.chunk(2)``, ``channel_shuffle(cat([x1, branch(x2)]), 2)``.
    Each shuffle merges channel j of x1 with channel j of the branch, and x2's units leave the stream,
    so each block's branch output lies in half as many units of the stem's group as the one before:
    the fourth in one unit, the third in two."""

    def __init__(self, c: int = 16, blocks: int = 4):
        super().__init__()
        h = c // 2
        self.stem = nn.Conv2d(3, c, 1)
        self.branches = nn.ModuleList(nn.Sequential(
            nn.Conv2d(h, h, 1), nn.BatchNorm2d(h), nn.ReLU(), nn.Conv2d(h, h, 3, padding=1, groups=h),
            nn.BatchNorm2d(h), nn.Conv2d(h, h, 1), nn.BatchNorm2d(h), nn.ReLU()) for _ in range(blocks))
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        for branch in self.branches:
            x1, x2 = x.chunk(2, dim=1)
            x = torch.channel_shuffle(torch.cat([x1, branch(x2)], 1), 2)
        return self.head(x.mean((2, 3)))


def _check_random_group_masks(model: nn.Module, x: torch.Tensor, analysis: fxprune.Analysis, draws) -> None:
    """Masks keeping a random subset (at least one unit) of every prunable group: compact is exact."""
    for masks in draws:
        small, _ = quiet_compact(model, masks, x, analysis)
        assert emptied_tensors(analysis, surviving_units(analysis, masks, small.meta["fxprune_report"])) == []
        assert_outputs_close(out(small, x), out(fxprune.apply_masks(model, masks, x, analysis), x), f"masks {masks}")


def _random_group_masks(analysis: fxprune.Analysis, keep: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for group in analysis.groups:
        if group.prunable:
            mask = torch.rand(group.size, generator=g) < keep
            mask[torch.randint(group.size, (), generator=g)] = True
            masks[group.name] = mask
    return masks


@functools.lru_cache(maxsize=None)
def _shuffle_stages() -> tuple[nn.Module, torch.Tensor, fxprune.Analysis]:
    from fxprune.zoo import randomize_constants

    torch.manual_seed(0)
    model, x = randomize_constants(_ShuffleStages()).eval(), torch.randn(2, 3, 5, 5)
    return model, x, fxprune.analyze(model, x)


@settings(max_examples=max(10, settings.default.max_examples // 4))  # one fixed model: fewer draws do
@given(data=st.data())
def test_shuffle_stages_accept_every_mask_keeping_a_unit_of_each_group(data):
    """Regression (ShuffleNet V2): masks keeping units of every group but none of a late branch's
    raised "MaskError: the masks remove every channel of 'stage3.6.branch2.5'" in compact. The
    analysis lists the branch outputs as values that keep a unit; every such mask is exact."""
    model, x, analysis = _shuffle_stages()
    lone = {e.name: len(e.units) for e in analysis.emptiable}
    assert lone["branches.3.5"] == 1 and lone["branches.2.5"] == 2, lone  # the last conv of each branch
    assert "unit" in analysis.group("stem").note and analysis.group("stem").prunable
    _check_random_group_masks(model, x, analysis, [data.draw(masks_for(analysis, avoid_empty=False), label="masks").masks])


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "shufflenet_v2_x1_0"])
def test_shufflenet_accepts_every_mask_keeping_a_unit_of_each_group(name):
    """The same on torchvision's ShuffleNet V2: random masks of every prunable group (some removing
    a whole late branch) compact exactly."""
    from fxprune.zoo import randomize_constants, torchvision_models

    torch.manual_seed(0)
    model = randomize_constants(getattr(torchvision_models(), name)(num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    analysis = fxprune.analyze(model, x)
    draws = [_random_group_masks(analysis, keep, seed) for seed, keep in enumerate((0.1, 0.5, 0.9))]
    emptied = [emptied_tensors(analysis, [masks.get(g.name, torch.ones(g.size, dtype=torch.bool)) for g in analysis.groups])
               for masks in draws]
    assert any(emptied), "no draw removes a whole value: the check would not cover the regression"
    _check_random_group_masks(model, x, analysis, draws)


class _ComputedShuffle(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.groups = groups
        self.a, self.b = nn.Conv2d(3, c, 1), nn.Conv2d(c, 5, 1)

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.size(0), x.size(1), x.size(2), x.size(3)
        x = x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.b(x)


ONE_PER_GROUP_BUG = pytest.mark.xfail(strict=True, reason=(
    "BUG: a shuffle written as x.view(n, g, c // g, h, w) with one channel per group (c == g) has a "
    "size-1 inner dim, so the units run along the groups dim (one per channel); removing one changes "
    "the group count, which compact cannot rewrite (it is not a literal view size): CompactError"))


@pytest.mark.parametrize("c, groups", [
    (4, 2), (8, 4), (16, 4),  # regression: units ran along the groups dim when c // g <= g
    pytest.param(2, 2, marks=ONE_PER_GROUP_BUG), pytest.param(4, 4, marks=ONE_PER_GROUP_BUG),
])
def test_computed_channel_shuffle(c, groups):
    torch.manual_seed(0)
    model, x = _ComputedShuffle(c, groups).eval(), torch.randn(1, 3, 4, 4)
    g = fxprune.analyze(model, x).group("a")
    _check_compact_or_mask_error(model, {"a": torch.arange(g.size) != 0}, x)


@pytest.mark.parametrize("keep", [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], ids=["wrong-permutation", "indivisible"])
def test_channel_shuffle_module(keep):
    """Regression: nn.ChannelShuffle used to be followed as a plain move (every channel its own
    unit), which silently changed the permutation or broke divisibility."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ChannelShuffle(2), nn.Conv2d(6, 5, 1)).eval()
    _check_compact_or_mask_error(model, {"0": torch.tensor(keep, dtype=torch.bool)}, torch.randn(1, 3, 4, 4))


class _FnShuffle(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        return torch.channel_shuffle(x, self.groups)


@pytest.mark.parametrize("c, groups", [
    (16, 4),  # regression: the units ran along the groups dim, a different permutation after compact
    (2, 2), (4, 4),  # one channel per group: the group count cannot change, so all is one unit
])
@pytest.mark.parametrize("make", [_FnShuffle, nn.ChannelShuffle], ids=["torch.channel_shuffle", "nn.ChannelShuffle"])
def test_channel_shuffle_groups_dim(make, c, groups):
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, c, 1), make(groups), nn.Conv2d(c, 5, 1)).eval(), torch.randn(2, 3, 4, 4)
    g = fxprune.analyze(model, x).group("0")
    if c == groups:
        assert g.size == 1
        return
    _check_compact_or_mask_error(model, {"0": torch.arange(g.size) != g.size - 1}, x)


class _GroupedAfterRepeat(nn.Module):
    """A grouped conv reading cat([y, y]) of a one-channel y: every input channel is y's unit."""

    def __init__(self):
        super().__init__()
        self.a, self.g, self.b = nn.Conv2d(3, 1, 1), nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(self.g(torch.cat([y, y], 1)))


def test_grouped_conv_on_the_input_is_not_prunable():
    """Regression: per_index gave NONE along a channel dim carrying one label, so the groups of a
    grouped conv reading the model input became prunable (and compact then failed)."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, 6, 1, groups=3), nn.ReLU(), nn.Conv2d(6, 2, 1)).eval(), torch.randn(2, 3, 5, 5)
    group = fxprune.analyze(model, x).group("0")
    assert not group.prunable, f"group '0' ({group.size} units) should be blocked by the model input"


def test_grouped_conv_on_a_repeated_channel():
    """Regression: same cause, for a grouped conv reading cat([y, y]) of a one-channel y."""
    torch.manual_seed(0)
    model, x = _GroupedAfterRepeat().eval(), torch.randn(2, 3, 5, 5)
    _check_compact_or_mask_error(model, {"g": torch.tensor([True, True, False, False])}, x)


class _InplaceAfterConsumer(nn.Module):
    """y feeds conv b, then an in-place ReLU; a removed channel of y carries the BN shift -0.5."""

    def __init__(self):
        super().__init__()
        self.a, self.t, self.bn = nn.Conv2d(3, 4, 1), nn.Tanh(), nn.BatchNorm2d(4)
        self.b, self.r, self.c = nn.Conv2d(4, 2, 1), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.bn(self.t(self.a(x)))
        return self.b(y) + self.c(self.r(y))


def test_inplace_activation_on_a_shared_tensor():
    """Regression: the probe stored a consumer's input without copying it, and a later in-place op
    on the same tensor changed the measured constant."""
    torch.manual_seed(0)
    model = _InplaceAfterConsumer().eval()
    with torch.no_grad():
        model.bn.bias.fill_(-0.5)
        model.bn.running_mean.zero_()
    _check_compact_or_mask_error(model, {"a": torch.tensor([True, False, True, True])}, torch.randn(1, 3, 4, 4))


class _ViewShuffle(nn.Module):
    """ShuffleNet v2's channel_shuffle: sizes computed from x, groups a Python constant."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.size(0), x.size(1), x.size(2), x.size(3)
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)


VIEW_AFTER_SHUFFLE_BUG = pytest.mark.xfail(strict=True, reason=(
    "BUG: after a first shuffle the labels of a second shuffle written as x.view(n, g, c // g, ...) "
    "vary only along the groups dim, so the units run along it; removing one changes the group "
    "count, which the computed c // g cannot follow: CompactError"))


@pytest.mark.parametrize("make", [_FnShuffle, nn.ChannelShuffle, pytest.param(_ViewShuffle, marks=VIEW_AFTER_SHUFFLE_BUG)],
                         ids=["torch.channel_shuffle", "nn.ChannelShuffle", "view-computed"])
def test_channel_shuffle_after_channel_shuffle(make):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 1), make(4), nn.Tanh(), make(4), nn.Conv2d(8, 3, 1)).eval()
    x = torch.randn(2, 4, 8, 4)
    g = fxprune.analyze(model, x).group("0")
    if make is not _ViewShuffle:  # the group count stays: two shuffles of 8 channels in 4 groups tie all
        assert g.size == 1
        return
    _check_compact_or_mask_error(model, {"0": torch.arange(g.size) != g.size - 1}, x)
