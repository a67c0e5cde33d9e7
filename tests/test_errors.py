"""Errors on bad input, the user's model left untouched, and removed channels that carry a constant."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune

X = torch.randn(2, 3, 8, 8)


def keep(n: int, *drop: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[list(drop)] = False
    return mask


class Net(nn.Module):
    """conv1 -> bn1 -> relu -> conv2, and a head whose channels reach the output."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.conv2(F.relu(self.bn1(self.conv1(x))))))


ENTRY_POINTS = {
    "apply_masks": lambda model, masks, x: fxprune.apply_masks(model, masks, x),
    "compact": lambda model, masks, x: fxprune.compact(model, masks, x),
}
entry_points = pytest.mark.parametrize("fn", list(ENTRY_POINTS.values()), ids=list(ENTRY_POINTS))


# --------------------------------------------------------------------------------------------
# MaskError


@entry_points
def test_unknown_key_names_it_and_suggests_close_names(fn):
    with pytest.raises(fxprune.MaskError) as err:
        fn(Net(), {"conv_1": keep(8, 1)}, X)
    msg = str(err.value)
    assert "'conv_1'" in msg
    assert "did you mean" in msg and "'conv1'" in msg


@entry_points
def test_unknown_key_without_close_names(fn):
    with pytest.raises(fxprune.MaskError, match="'zzz' names no channel group or producing module"):
        fn(Net(), {"zzz": keep(8, 1)}, X)


def test_close_name_suggestions_are_distinct():
    with pytest.raises(fxprune.MaskError) as err:
        fxprune.compact(Net(), {"conv_1": keep(8, 1)}, X)
    suggestions = str(err.value).split("did you mean")[1]
    assert suggestions.count("'conv1'") == 1, suggestions


@entry_points
@pytest.mark.parametrize("key", ["conv1", "conv2"])
def test_wrong_length(fn, key):
    with pytest.raises(fxprune.MaskError) as err:
        fn(Net(), {key: keep(7, 1)}, X)
    msg = str(err.value)
    assert f"'{key}'" in msg and "7 entries" in msg
    assert ("8 channels" if key == "conv1" else "6 channels") in msg


@entry_points
@pytest.mark.parametrize("mask", [
    torch.ones(8), torch.ones(8, dtype=torch.int64), torch.ones(8, dtype=torch.uint8), [True] * 8,
    torch.ones(2, 4, dtype=torch.bool),
], ids=["float", "int64", "uint8", "list", "2-d"])
def test_wrong_dtype_or_type_or_rank(fn, mask):
    with pytest.raises(fxprune.MaskError) as err:
        fn(Net(), {"conv1": mask}, X)
    msg = str(err.value)
    assert "'conv1'" in msg
    assert "bool" in msg or "1-D" in msg


def test_mask_error_is_a_value_error():
    assert issubclass(fxprune.MaskError, ValueError)
    assert issubclass(fxprune.MaskError, fxprune.FxpruneError)


@entry_points
def test_mask_on_output_group_quotes_its_reason(fn):
    model = Net()
    reason = fxprune.analyze(model, X).group("head").reason
    assert reason == "reaches the model output"
    with pytest.raises(fxprune.MaskError) as err:
        fn(model, {"head": keep(4, 0)}, X)
    assert "'head'" in str(err.value) and "not prunable" in str(err.value) and reason in str(err.value)


class Boundary(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.cumsum(self.a(x), 1))


def layer_norm_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 2))


@entry_points
def test_mask_on_blocked_group_quotes_its_reason(fn):
    m = Boundary()
    g = next(g for g in fxprune.analyze(m, X).groups if "a" in g.producers)
    assert not g.prunable and g.blocked and g.reason
    with pytest.raises(fxprune.MaskError) as err:
        fn(m, {"a": keep(8, 1)}, X)
    assert g.reason in str(err.value) and "exact=False" not in str(err.value)


def test_compact_refuses_an_inexact_group_unless_asked():
    m, x = layer_norm_net(), torch.randn(4, 3)
    g = next(g for g in fxprune.analyze(m, x).groups if "0" in g.producers)
    assert not g.prunable and not g.exact and not g.blocked
    with pytest.raises(fxprune.MaskError) as err:
        fxprune.compact(m, {"0": keep(8, 1)}, x)
    assert g.reason in str(err.value) and "exact=False" in str(err.value)


def test_masking_an_inexact_group_is_well_defined():
    m, x = layer_norm_net(), torch.randn(4, 3)
    ref = fxprune.apply_masks(m, {"0": keep(8, 1)}, x)
    captured = {}
    ref.get_submodule("1").register_forward_hook(lambda mod, inp, out: captured.update(x=inp[0]))
    ref(x)
    assert bool((captured["x"][:, 1] == 0).all()) and bool((captured["x"][:, 0] != 0).all())


def test_inexact_compaction_reports_its_deviation():
    torch.manual_seed(0)
    m, x = layer_norm_net().eval(), torch.randn(4, 3)
    with pytest.warns(UserWarning, match="largest deviation"):
        small = fxprune.compact(m, {"0": keep(8, 1, 5)}, x, exact=False)
    assert small.get_submodule("1").normalized_shape == (6,)
    ref = fxprune.apply_masks(m, {"0": keep(8, 1, 5)}, x)
    with torch.no_grad():
        assert small.meta["fxprune_deviation"] == pytest.approx(float((small(x) - ref(x)).abs().max()))
    assert small.meta["fxprune_deviation"] > 0


def test_all_true_mask_on_non_prunable_group_is_accepted():
    model = Net().eval()
    out = fxprune.compact(model, {"head": keep(4)}, X)
    with torch.no_grad():
        torch.testing.assert_close(out(X), model(X))


@entry_points
def test_mask_emptying_a_group_outside_any_layer_names_it(fn):
    with pytest.raises(fxprune.MaskError, match="'conv1' removes every channel, and the group lives in no removable layer"):
        fn(Net(), {"conv1": torch.zeros(8, dtype=torch.bool)}, X)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c(self.a(x) + self.b(x))


def test_producer_masks_emptying_a_group_together_name_it():
    with pytest.raises(fxprune.MaskError, match="group 'a' removes every channel"):
        fxprune.compact(Residual(), {"a": torch.zeros(4, dtype=torch.bool), "b": torch.zeros(4, dtype=torch.bool)}, X)


def test_one_producer_mask_keeps_a_unit_the_other_keeps():
    """Producer masks vote per unit: a channel kept by b stays (zeroed in a), and it is exact."""
    model = Residual().eval()
    masks = {"a": torch.zeros(4, dtype=torch.bool), "b": keep(4, 0, 1)}
    ref = fxprune.apply_masks(model, masks, X).eval()
    out = fxprune.compact(model, masks, X).eval()
    assert out.a.weight.shape == (2, 3, 1, 1) and out.c.weight.shape == (2, 2, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(out(X), ref(X), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# TraceError


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.block = nn.Sequential(nn.ReLU(), DataDependent())

    def forward(self, x):
        return self.block(self.conv(x))


@pytest.mark.parametrize("fn", [
    lambda m: fxprune.analyze(m, X), lambda m: fxprune.trace(m, X),
    lambda m: fxprune.compact(m, {"conv": keep(3, 0)}, X), lambda m: fxprune.apply_masks(m, {}, X),
], ids=["analyze", "trace", "compact", "apply_masks"])
def test_untraceable_model_names_the_module(fn):
    with pytest.raises(fxprune.TraceError) as err:
        fn(Outer())
    msg = str(err.value)
    assert "'block.1'" in msg and "DataDependent" in msg
    assert "leaf_modules" in msg  # the hint


def test_untraceable_root_is_named():
    with pytest.raises(fxprune.TraceError, match="'<root>' \\(DataDependent\\)"):
        fxprune.analyze(DataDependent(), X)


class Loop(nn.Module):
    """Iterates over a tensor: FX cannot trace it, but it runs on any tensor."""

    def forward(self, x):
        return torch.stack([t * 2 for t in x], 0)


class OuterLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.loop, self.c = nn.Conv2d(3, 8, 1), Loop(), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(self.loop(self.conv(x)))


def test_untraceable_module_as_leaf_becomes_a_boundary():
    with pytest.raises(fxprune.TraceError, match="'loop' \\(Loop\\)"):
        fxprune.analyze(OuterLoop(), X)
    an = fxprune.analyze(OuterLoop(), X, leaf_modules=["loop"])
    assert not an.group("conv").prunable
    assert "Loop module 'loop'" in an.group("conv").reason
    assert an.group("c").reason == "reaches the model output"


def test_data_dependent_module_as_leaf_follows_the_hint():
    an = fxprune.analyze(Outer(), X, leaf_modules=["block.1"])
    assert "DataDependent module 'block.1'" in an.group("conv").reason


def test_shape_errors_are_trace_errors():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(5, 4, 1))
    with pytest.raises(fxprune.TraceError, match="shape propagation failed"):
        fxprune.analyze(model, X)


# --------------------------------------------------------------------------------------------
# the user's model is never changed


def snapshot(model: nn.Module) -> dict:
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = {k: v.requires_grad for k, v in model.named_parameters()}
    return {"state": state, "flags": flags, "training": [m.training for m in model.modules()],
            "modules": repr(model), "ptrs": {k: v.data_ptr() for k, v in model.state_dict().items()}}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert after["flags"] == before["flags"]
    assert after["training"] == before["training"]
    assert after["modules"] == before["modules"]
    assert after["ptrs"] == before["ptrs"]


def storages(module: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}


def train_model() -> nn.Module:
    torch.manual_seed(0)
    model = Net().train()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
        model.bn1.num_batches_tracked.fill_(7)
    model.head.weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("step", ["analyze", "apply_masks", "compact", "compact-then-train-run"])
def test_model_is_untouched_in_train_mode(step):
    model = train_model()
    before = snapshot(model)
    masks = {"conv1": keep(8, 1, 5), "conv2": keep(6, 0)}
    if step == "analyze":
        fxprune.analyze(model, X)
    elif step == "apply_masks":
        fxprune.apply_masks(model, masks, X)
    else:
        out = fxprune.compact(model, masks, X)
        if step == "compact-then-train-run":
            out.train()
            out(X).sum().backward()
            with torch.no_grad():
                for p in out.parameters():
                    p.add_(1.0)
                for b in out.buffers():
                    b.add_(1)
    assert_unchanged(model, before)
    assert model.bn1.num_batches_tracked.item() == 7


@pytest.mark.parametrize("fn", list(ENTRY_POINTS.values()), ids=list(ENTRY_POINTS))
def test_result_shares_no_storage_with_the_model(fn):
    model = train_model()
    for masks in ({}, {"conv1": keep(8, 1, 5)}):
        out = fn(model, masks, X)
        assert storages(out).isdisjoint(storages(model)), [
            n for n, t in [*out.named_parameters(), *out.named_buffers()]
            if t.untyped_storage().data_ptr() in storages(model)]


def test_compact_keeps_requires_grad_flags():
    model = train_model()
    out = fxprune.compact(model, {"conv1": keep(8, 1)}, X)
    assert out.conv1.weight.requires_grad and not out.head.weight.requires_grad


def test_analysis_can_be_reused_without_changing_it():
    model = Net().eval()
    an = fxprune.analyze(model, X)
    table = str(an)
    a = fxprune.compact(model, {"conv1": keep(8, 1)}, X, analysis=an)
    b = fxprune.compact(model, {"conv1": keep(8, 2, 3)}, X, analysis=an)
    assert str(an) == table
    assert a.conv1.weight.shape[0] == 7 and b.conv1.weight.shape[0] == 6
    assert an.gm.conv1.weight.shape[0] == 8


# --------------------------------------------------------------------------------------------
# removed channels that still carry a value: folded, or kept and reported


class AddNorm(nn.Module):
    """conv a + conv b -> BatchNorm -> relu -> consumer c: the BatchNorm is not directly after a
    producer, so a removed channel leaves it as the constant relu(shift)."""

    def __init__(self, kernel: int = 1, padding: int = 0, bias: bool = True):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 4, kernel, padding=padding, bias=bias)
        with torch.no_grad():
            self.bn.bias.uniform_(0.5, 1.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.c(F.relu(self.bn(self.a(x) + self.b(x))))


class Gate(nn.Module):
    """conv a -> sigmoid -> consumer c: sigmoid(0) = 0.5."""

    def __init__(self, consumer: nn.Module):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 8, 1), consumer

    def forward(self, x):
        y = torch.sigmoid(self.a(x))
        return self.c(y.flatten(1) if isinstance(self.c, nn.Linear) else y)


def compact_checked(model: nn.Module, masks: dict, x=X):
    model.eval()
    ref = fxprune.apply_masks(model, masks, x).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fxprune.compact(model, masks, x).eval()
    with torch.no_grad():
        for inp in (x, torch.randn_like(x)):
            torch.testing.assert_close(out(inp), ref(inp), rtol=1e-5, atol=1e-5)
    return out, [w for w in caught if "fxprune" in str(w.message)]


def actions(out) -> list[tuple]:
    return [(a.group, a.channel, a.consumer, a.action) for a in out.meta["fxprune_report"]]


@pytest.mark.parametrize("model, consumer", [
    (lambda: AddNorm(1, 0), "c"), (lambda: AddNorm(3, 0), "c"), (lambda: AddNorm(1, 0, bias=False), "c"),
    (lambda: Gate(nn.Conv2d(8, 4, 1, bias=False)), "c"), (lambda: Gate(nn.Linear(8 * 64, 4)), "c"),
], ids=["add-bn-relu-1x1", "add-bn-relu-3x3-unpadded", "add-bn-relu-no-bias", "sigmoid-1x1-no-bias", "sigmoid-linear"])
def test_constant_in_removed_channel_is_folded_into_bias(model, consumer):
    torch.manual_seed(0)
    m = model()
    out, caught = compact_checked(m, {"a": keep(8, 3)})
    assert set(actions(out)) == {("a", 3, consumer, "folded")}  # (a Linear reports each of the 64 features)
    assert all("into bias" in a.detail for a in out.meta["fxprune_report"])
    assert not caught
    assert out.a.weight.shape[0] == 7
    assert out.c.bias is not None and out.c.bias.shape == (4,)
    if isinstance(out.c, nn.Conv2d):
        assert out.c.in_channels == 7 and out.c.weight.shape[1] == 7
    else:
        assert out.c.in_features == 7 * 64


def test_two_removed_constant_channels_are_both_folded():
    torch.manual_seed(0)
    out, _ = compact_checked(AddNorm(), {"a": keep(8, 0, 6)})
    assert sorted(actions(out)) == [("a", 0, "c", "folded"), ("a", 6, "c", "folded")]
    assert out.c.weight.shape == (4, 6, 1, 1)


@pytest.mark.parametrize("model", [lambda: AddNorm(3, 1), lambda: Gate(nn.Conv2d(8, 4, 3, padding=1))],
                         ids=["add-bn-relu", "sigmoid"])
def test_constant_into_padded_conv_is_kept_and_reported(model):
    torch.manual_seed(0)
    m = model()
    with pytest.warns(UserWarning, match="kept some masked channels"):
        fxprune.compact(m.eval(), {"a": keep(8, 3)}, X)
    out, caught = compact_checked(m, {"a": keep(8, 3, 5)})
    assert sorted(actions(out)) == [("a", 3, "c", "kept"), ("a", 5, "c", "kept")]
    assert all("padded conv" in a.detail for a in out.meta["fxprune_report"])
    assert caught and "group 'a' channel 3 at 'c': kept" in str(caught[0].message)
    assert out.a.out_channels == 8 and out.c.in_channels == 8  # kept, but zeroed
    with torch.no_grad():
        assert out.a(X)[:, [3, 5]].abs().sum() > 0  # the producer itself is unchanged...
        ref = fxprune.apply_masks(m, {"a": keep(8, 3, 5)}, X).eval()
        torch.testing.assert_close(out(X), ref(X), rtol=1e-5, atol=1e-5)  # ...its channels are zeroed after it


def test_input_dependent_value_in_removed_channel_is_kept():
    """x + y[broadcast]: a removed channel of x becomes y, which depends on the input."""

    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.s, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 1, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.c(self.a(x) + self.s(x))

    torch.manual_seed(0)
    out, caught = compact_checked(Broadcast(), {"a": keep(8, 2)})
    assert actions(out) == [("a", 2, "c", "kept")]
    assert "input-dependent" in out.meta["fxprune_report"][0].detail
    assert caught


def test_no_report_when_removed_channels_are_zero():
    torch.manual_seed(0)
    out, caught = compact_checked(Net(), {"conv1": keep(8, 1), "conv2": keep(6, 2)})
    assert out.meta["fxprune_report"] == [] and not caught
