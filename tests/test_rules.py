"""One test table per channel rule in ``fxprune/rules``.

Every case builds a small model, checks the channel groups ``fxprune.analyze`` finds (names, sizes,
prunable flags, reasons), and, where it prunes, that the compact model

* equals the ``apply_masks`` reference (eval mode, rtol 1e-5) on the example and on a fresh input,
* has the expected parameter shapes and module attributes,
* has module attributes consistent with its parameters and with the tensors it really receives.

Known library bugs are ``xfail(strict=True)`` with the bug in the reason.
"""
from __future__ import annotations

import contextlib
import operator
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.rules import RULES

OUTPUT = "reaches the model output"


_EXPECTED_FAILURE = False


@pytest.fixture(autouse=True)
def _expected_failure(request):
    """Whether the running test is a known bug (xfail): its errors are then reported briefly."""
    global _EXPECTED_FAILURE
    _EXPECTED_FAILURE = request.node.get_closest_marker("xfail") is not None
    yield
    _EXPECTED_FAILURE = False


@contextlib.contextmanager
def brief_if_expected():
    """Formatting the deep, chained tracebacks of expected failures takes seconds: shorten them.
    Unexpected failures keep their full traceback."""
    try:
        yield
    except Exception as e:
        if not _EXPECTED_FAILURE:
            raise
        raise AssertionError(f"{type(e).__name__}: {str(e)[:300]}") from None


# --------------------------------------------------------------------------------------------
# helpers


def keep(n: int, *drop: int) -> torch.Tensor:
    """A keep-mask of ``n`` channels without ``drop``."""
    mask = torch.ones(n, dtype=torch.bool)
    mask[list(drop)] = False
    return mask


class Fn(nn.Module):
    """A parameter-free module running ``fn`` (traced through, so its ops become graph nodes)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def seq(**layers: Any) -> nn.Sequential:
    """A Sequential with named layers; plain functions are wrapped in :class:`Fn`."""
    return nn.Sequential(OrderedDict((k, v if isinstance(v, nn.Module) else Fn(v)) for k, v in layers.items()))


class Two(nn.Module):
    """Two producers ``a`` and ``b`` on the same input, combined by ``op``, then consumer ``c``."""

    def __init__(self, op: Callable, a: nn.Module, b: nn.Module, c: nn.Module):
        super().__init__()
        self.a, self.b, self.c = a, b, c
        self.op = op

    def forward(self, x):
        return self.c(self.op(self.a(x), self.b(x)))


def randomize(model: nn.Module) -> nn.Module:
    """Non-trivial normalisation statistics and affine parameters, PReLU slopes and buffers."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5)
    return model


def fresh_like(x: torch.Tensor) -> torch.Tensor:
    """Another input of the same kind as ``x``."""
    if x.is_floating_point():
        return torch.randn(x.shape, dtype=x.dtype)
    return torch.randint(0, int(x.max()) + 1, x.shape, dtype=x.dtype)


def outputs(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for v in value for t in outputs(v)]


def module_inputs(gm: nn.Module, x: torch.Tensor) -> dict[str, list[torch.Size]]:
    """The shape of the first input every submodule receives when ``gm`` runs on ``x``."""
    seen: dict[str, list[torch.Size]] = {}
    hooks = []
    for name, m in gm.named_modules():
        if name and not list(m.children()):
            def hook(mod, args, name=name):
                if args and isinstance(args[0], torch.Tensor):
                    seen.setdefault(name, []).append(args[0].shape)
            hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            gm(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def assert_consistent(gm: nn.Module, x: torch.Tensor) -> None:
    """Module attributes agree with their parameters and with the inputs they really get."""
    inputs = module_inputs(gm, x)
    for name, m in gm.named_modules():
        shapes = inputs.get(name, [])
        if isinstance(m, nn.modules.conv._ConvNd):
            outer, inner = m.weight.shape[:2]
            if m.transposed:
                assert (m.in_channels, m.out_channels) == (outer, inner * m.groups), name
            else:
                assert (m.out_channels, m.in_channels) == (outer, inner * m.groups), name
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, name
            if m.bias is not None:
                assert m.bias.shape == (m.out_channels,), name
            assert all(s[1] == m.in_channels for s in shapes), (name, shapes)
        elif isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features), name
            if m.bias is not None:
                assert m.bias.shape == (m.out_features,), name
            assert all(s[-1] == m.in_features for s in shapes), (name, shapes)
        elif isinstance(m, nn.modules.batchnorm._NormBase):  # BatchNorm, InstanceNorm
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                if t is not None:
                    assert t.shape == (m.num_features,), name
            assert all(s[1] == m.num_features for s in shapes), (name, shapes, m.num_features)
        elif isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0, name
            if m.weight is not None:
                assert m.weight.shape == (m.num_channels,), name
            assert all(s[1] == m.num_channels for s in shapes), name
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                assert tuple(m.weight.shape) == tuple(m.normalized_shape), name
            assert all(tuple(s[-len(m.normalized_shape):]) == tuple(m.normalized_shape) for s in shapes), name
        elif isinstance(m, nn.Embedding):
            assert m.weight.shape == (m.num_embeddings, m.embedding_dim), name
        elif isinstance(m, nn.PReLU):
            assert m.weight.numel() == m.num_parameters, name
            assert all(m.num_parameters in (1, s[1]) for s in shapes), name


def check_exact(model: nn.Module, x: torch.Tensor, masks: dict, analysis=None):
    """compact == apply_masks (eval) on ``x`` and a fresh input; returns (compact, reference)."""
    with brief_if_expected():
        return _check_exact(model, x, masks, analysis)


def _check_exact(model: nn.Module, x: torch.Tensor, masks: dict, analysis=None):
    model.eval()
    ref = fxprune.apply_masks(model, masks, x, analysis=analysis).eval()
    small = fxprune.compact(model, masks, x, analysis=analysis).eval()
    with torch.no_grad():
        for inp in (x, fresh_like(x)):
            for got, want in zip(outputs(small(inp)), outputs(ref(inp)), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_consistent(small, x)
    return small, ref


def table(an: fxprune.Analysis) -> dict[str, tuple[int, bool]]:
    return {g.name: (g.size, g.prunable) for g in an.groups}


@dataclass
class Case:
    """A model, what the analysis must find, and what compaction must produce.

    ``groups`` lists every group as name -> (size, prunable); ``reasons`` maps a group to
    substrings of its reason; ``shapes`` maps a parameter or buffer of the compact model to its
    shape and ``attrs`` a module attribute to its value; ``check(model, analysis, compact)`` adds
    case-specific assertions.
    """

    make: Callable[[], nn.Module]
    x: Callable[[], torch.Tensor]
    groups: dict[str, tuple[int, bool]]
    masks: dict[str, torch.Tensor] | None = None
    shapes: dict[str, tuple] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, list[str] | str] = field(default_factory=dict)
    check: Callable | None = None
    leaf_modules: tuple = ()


def check_case(case: Case):
    with brief_if_expected():
        return _check_case(case)


def _check_case(case: Case):
    torch.manual_seed(0)
    model = randomize(case.make()).eval()
    x = case.x()
    an = fxprune.analyze(model, x, leaf_modules=case.leaf_modules)
    assert table(an) == case.groups, str(an)
    for name, needles in case.reasons.items():
        reason = an.group(name).reason or ""
        for needle in [needles] if isinstance(needles, str) else needles:
            assert needle in reason, (name, reason)
    for g in an.groups:
        assert g.prunable == (g.reason is None), g
        assert g.name in str(an)
    small = None
    if case.masks is not None:
        small, _ = check_exact(model, x, case.masks, analysis=an)
        params = dict(small.named_parameters()) | dict(small.named_buffers())
        for name, shape in case.shapes.items():
            assert tuple(params[name].shape) == tuple(shape), (name, tuple(params[name].shape))
        for path, value in case.attrs.items():
            assert operator.attrgetter(path)(small) == value, (path, operator.attrgetter(path)(small))
    if case.check is not None:
        case.check(model, an, small)
    return model, an, small


def cases(table_: dict[str, Case | Any]) -> list:
    return [v if not isinstance(v, Case) else pytest.param(v, id=k) for k, v in table_.items()]


def img(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(*shape)


X = img(2, 3, 6, 6)


def producers_are(group: str, expected: list[str]):
    def check(model, an, small):
        assert sorted(an.group(group).producers) == sorted(expected), an.group(group).producers
    return check


def columns_removed(consumer: str, kept_columns: list[int], dim: int = 1):
    """The consumer's compact weight is its original weight at ``kept_columns`` along ``dim``."""
    def check(model, an, small):
        old = model.get_submodule(consumer).weight
        new = small.get_submodule(consumer).weight
        torch.testing.assert_close(new, old.index_select(dim, torch.tensor(kept_columns)), rtol=0, atol=0)
    return check


def reported(*adjustments: tuple):
    """The compact model's report lists exactly these (action, group, channel, consumer)."""
    def check(model, an, small):
        got = [(a.action, a.group, a.channel, a.consumer) for a in small.meta["fxprune_report"]]
        assert got == list(adjustments), small.meta["fxprune_report"]
    return check


def grouped_weight(conv: str, rows: list[int], columns: list[int]):
    """The grouped conv's compact weight is its original weight at ``rows`` (dim 0) and ``columns``
    (dim 1, the channels of a group)."""
    def check(model, an, small):
        old = model.get_submodule(conv).weight[rows][:, columns]
        torch.testing.assert_close(small.get_submodule(conv).weight, old, rtol=0, atol=0)
    return check


def all_of(*checks):
    def check(model, an, small):
        for c in checks:
            c(model, an, small)
    return check


# --------------------------------------------------------------------------------------------
# conv.py: ConvNd and ConvTransposeNd, grouped and depthwise

class GroupedResidual(nn.Module):
    """head(y + relu(grouped(y))), y = stem(x): a conv of 2 groups on a residual stream."""

    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU())

    def forward(self, x):
        y = self.stem(x)
        return self.head(y + self.body(y))


CONV = {
    "conv2d": Case(
        lambda: seq(a=nn.Conv2d(3, 8, 3, padding=1), r=nn.ReLU(), c=nn.Conv2d(8, 4, 1)), X,
        {"a": (8, True), "c": (4, False)}, {"a": keep(8, 1, 6)},
        shapes={"a.weight": (6, 3, 3, 3), "a.bias": (6,), "c.weight": (4, 6, 1, 1), "c.bias": (4,)},
        attrs={"a.out_channels": 6, "c.in_channels": 6}, reasons={"c": OUTPUT},
        check=columns_removed("c", [0, 2, 3, 4, 5, 7]),
    ),
    "conv2d-no-bias": Case(
        lambda: seq(a=nn.Conv2d(3, 8, 3, bias=False), c=nn.Conv2d(8, 4, 1, bias=False)), X,
        {"a": (8, True), "c": (4, False)}, {"a": keep(8, 0)},
        shapes={"a.weight": (7, 3, 3, 3), "c.weight": (4, 7, 1, 1)},
    ),
    "grouped": Case(
        lambda: seq(a=nn.Conv2d(3, 8, 1), g=nn.Conv2d(8, 8, 3, padding=1, groups=4), c=nn.Conv2d(8, 4, 1)), X,
        {"a": (4, True), "c": (4, False)}, {"a": keep(4, 1)},
        shapes={"a.weight": (6, 3, 1, 1), "g.weight": (6, 2, 3, 3), "g.bias": (6,), "c.weight": (4, 6, 1, 1)},
        attrs={"g.groups": 3, "g.in_channels": 6, "g.out_channels": 6},
        check=all_of(producers_are("a", ["a", "g"]), columns_removed("c", [0, 1, 4, 5, 6, 7])),
    ),
    "grouped-out-ne-in": Case(
        lambda: seq(a=nn.Conv2d(3, 8, 1), g=nn.Conv2d(8, 12, 3, padding=1, groups=4), c=nn.Conv2d(12, 4, 1)), X,
        {"a": (4, True), "c": (4, False)}, {"a": keep(4, 2)},
        shapes={"a.weight": (6, 3, 1, 1), "g.weight": (9, 2, 3, 3), "c.weight": (4, 9, 1, 1)},
        attrs={"g.groups": 3, "g.in_channels": 6, "g.out_channels": 9},
    ),
    "depthwise": Case(
        lambda: seq(a=nn.Conv2d(3, 8, 1), g=nn.Conv2d(8, 8, 3, padding=1, groups=8), c=nn.Conv2d(8, 4, 1)), X,
        {"a": (8, True), "c": (4, False)}, {"a": keep(8, 1, 6)},
        shapes={"a.weight": (6, 3, 1, 1), "g.weight": (6, 1, 3, 3), "c.weight": (4, 6, 1, 1)},
        attrs={"g.groups": 6, "g.in_channels": 6, "g.out_channels": 6},
        check=producers_are("a", ["a", "g"]),
    ),
    "depthwise-multiplier": Case(
        lambda: seq(a=nn.Conv2d(3, 8, 1), g=nn.Conv2d(8, 16, 3, padding=1, groups=8), c=nn.Conv2d(16, 4, 1)), X,
        {"a": (8, True), "c": (4, False)}, {"a": keep(8, 3)},
        shapes={"g.weight": (14, 1, 3, 3), "c.weight": (4, 14, 1, 1)},
        attrs={"g.groups": 7, "g.in_channels": 7, "g.out_channels": 14},
        check=columns_removed("c", [i for i in range(16) if i not in (6, 7)]),
    ),
    "depthwise-by-producer-mask": Case(  # a producer mask inside a unit: the unit stays, the channel is zeroed
        lambda: seq(a=nn.Conv2d(3, 8, 1), g=nn.Conv2d(8, 8, 3, padding=1, groups=4), c=nn.Conv2d(8, 4, 1)), X,
        {"a": (4, True), "c": (4, False)}, {"g": keep(8, 2)},
        shapes={"g.weight": (8, 2, 3, 3), "a.weight": (8, 3, 1, 1)}, attrs={"g.groups": 4},
    ),
    "conv-transpose": Case(
        lambda: seq(a=nn.Conv2d(3, 8, 1), t=nn.ConvTranspose2d(8, 6, 3, stride=2), c=nn.Conv2d(6, 4, 1)), X,
        {"a": (8, True), "t": (6, True), "c": (4, False)}, {"a": keep(8, 1), "t": keep(6, 2, 5)},
        shapes={"t.weight": (7, 4, 3, 3), "t.bias": (4,), "c.weight": (4, 4, 1, 1)},
        attrs={"t.in_channels": 7, "t.out_channels": 4, "t.groups": 1},
        check=columns_removed("c", [0, 1, 3, 4]),
    ),
    "conv-transpose-grouped": Case(  # 2 groups of 4 in, 3 out: per-group channels
        lambda: seq(a=nn.Conv2d(3, 8, 1), t=nn.ConvTranspose2d(8, 6, 3, stride=2, groups=2), c=nn.Conv2d(6, 4, 1)), X,
        {"a": (4, True), "t": (3, True), "c": (4, False)}, {"a": keep(4, 0), "t": keep(3, 2)},
        shapes={"a.weight": (6, 3, 1, 1), "t.weight": (6, 2, 3, 3), "t.bias": (4,), "c.weight": (4, 4, 1, 1)},
        attrs={"t.in_channels": 6, "t.out_channels": 4, "t.groups": 2},
        check=all_of(producers_are("a", ["a"]), grouped_weight("t", [1, 2, 3, 5, 6, 7], [0, 1]),
                     columns_removed("c", [0, 1, 3, 4])),
    ),
    "conv-transpose-whole-groups": Case(  # 4 groups of 2 in, 1 out: whole groups
        lambda: seq(a=nn.Conv2d(3, 8, 1), t=nn.ConvTranspose2d(8, 4, 3, stride=2, groups=4), c=nn.Conv2d(4, 4, 1)), X,
        {"a": (4, True), "c": (4, False)}, {"a": keep(4, 0)},
        shapes={"a.weight": (6, 3, 1, 1), "t.weight": (6, 1, 3, 3), "t.bias": (3,), "c.weight": (4, 3, 1, 1)},
        attrs={"t.in_channels": 6, "t.out_channels": 3, "t.groups": 3},
        check=producers_are("a", ["a", "t"]),
    ),
    "grouped-per-group-channels": Case(  # regression: 2 groups of 6 had 2 units (whole groups) and nothing shrank
        lambda: seq(a=nn.Conv2d(3, 12, 3, padding=1), r=nn.ReLU(), g=nn.Conv2d(12, 12, 3, padding=1, groups=2),
                    c=nn.Conv2d(12, 4, 1)), X,
        {"a": (6, True), "g": (6, True), "c": (4, False)}, {"a": keep(6, 1, 4), "g": keep(6, 0, 5)},
        shapes={"a.weight": (8, 3, 3, 3), "g.weight": (8, 4, 3, 3), "g.bias": (8,), "c.weight": (4, 8, 1, 1)},
        attrs={"g.groups": 2, "g.in_channels": 8, "g.out_channels": 8},
        check=all_of(producers_are("a", ["a"]), grouped_weight("g", [1, 2, 3, 4, 7, 8, 9, 10], [0, 2, 3, 5]),
                     columns_removed("c", [1, 2, 3, 4, 7, 8, 9, 10])),
    ),
    "grouped-per-group-channels-shifted": Case(  # a BatchNorm after the ReLU shifts the masked channels
        lambda: seq(a=nn.Conv2d(3, 12, 1), r=nn.ReLU(), n=nn.BatchNorm2d(12), g=nn.Conv2d(12, 6, 1, groups=2),
                    c=nn.Conv2d(6, 4, 1)), X,
        {"a": (6, True), "g": (3, True), "c": (4, False)}, {"a": keep(6, 1)},
        shapes={"a.weight": (12, 3, 1, 1), "g.weight": (6, 6, 1, 1)}, attrs={"g.groups": 2},
        check=reported(("kept", "a", 1, "g")),  # channels 1 and 7 hold other constants: no bias takes them
    ),
    "grouped-on-a-residual-stream": Case(  # the stream's units become channel i of every group
        lambda: GroupedResidual(), X, {"stem": (4, True), "head": (4, False)}, {"stem": keep(4, 3)},
        shapes={"stem.weight": (6, 3, 1, 1), "body.0.weight": (6, 3, 3, 3), "head.weight": (4, 6, 1, 1)},
        attrs={"body.0.groups": 2}, check=producers_are("stem", ["body.0", "stem"]),
    ),
    "conv1d-transpose1d": Case(
        lambda: seq(a=nn.Conv1d(3, 8, 3), n=nn.BatchNorm1d(8), t=nn.ConvTranspose1d(8, 6, 2, stride=2), c=nn.Conv1d(6, 4, 1)),
        img(2, 3, 10), {"a": (8, True), "t": (6, True), "c": (4, False)}, {"a": keep(8, 7), "t": keep(6, 0)},
        shapes={"a.weight": (7, 3, 3), "n.running_var": (7,), "t.weight": (7, 5, 2), "c.weight": (4, 5, 1)},
        attrs={"n.num_features": 7, "t.in_channels": 7, "t.out_channels": 5},
    ),
    "conv3d": Case(
        lambda: seq(a=nn.Conv3d(3, 8, 3), n=nn.BatchNorm3d(8), g=nn.Conv3d(8, 8, 1, groups=2), c=nn.Conv3d(8, 4, 1)),
        img(2, 3, 4, 4, 4), {"a": (4, True), "g": (4, True), "c": (4, False)}, {"a": keep(4, 1), "g": keep(4, 0, 3)},
        shapes={"a.weight": (6, 3, 3, 3, 3), "n.weight": (6,), "g.weight": (4, 3, 1, 1, 1), "c.weight": (4, 4, 1, 1, 1)},
        attrs={"g.groups": 2},
    ),
}


@pytest.mark.parametrize("case", cases(CONV))
def test_conv(case):
    check_case(case)


# --------------------------------------------------------------------------------------------
# linear.py and embedding.py

LINEAR = {
    "mlp": Case(
        lambda: seq(a=nn.Linear(10, 16), r=nn.ReLU(), c=nn.Linear(16, 3)), img(4, 10),
        {"a": (16, True), "c": (3, False)}, {"a": keep(16, 0, 5)},
        shapes={"a.weight": (14, 10), "a.bias": (14,), "c.weight": (3, 14)},
        attrs={"a.out_features": 14, "c.in_features": 14},
        check=columns_removed("c", [i for i in range(16) if i not in (0, 5)]),
    ),
    "mlp-3d-input": Case(
        lambda: seq(a=nn.Linear(10, 16), r=nn.GELU(), c=nn.Linear(16, 3, bias=False)), img(2, 5, 10),
        {"a": (16, True), "c": (3, False)}, {"a": keep(16, 15)},
        shapes={"a.weight": (15, 10), "c.weight": (3, 15)},
    ),
    "linear-batchnorm1d": Case(
        lambda: seq(a=nn.Linear(10, 16), n=nn.BatchNorm1d(16), r=nn.ReLU(), c=nn.Linear(16, 3)), img(4, 10),
        {"a": (16, True), "c": (3, False)}, {"a": keep(16, 3)},
        shapes={"n.weight": (15,), "n.running_mean": (15,), "c.weight": (3, 15)}, attrs={"n.num_features": 15},
    ),
    "embedding": Case(
        lambda: seq(e=nn.Embedding(20, 8), c=nn.Linear(8, 3)), lambda: torch.randint(0, 20, (2, 5)),
        {"e": (8, True), "c": (3, False)}, {"e": keep(8, 0, 5)},
        shapes={"e.weight": (20, 6), "c.weight": (3, 6)}, attrs={"e.embedding_dim": 6, "e.num_embeddings": 20},
        check=columns_removed("c", [1, 2, 3, 4, 6, 7]),
    ),
    "embedding-mean-pooled": Case(
        lambda: seq(e=nn.Embedding(20, 8, padding_idx=0), p=lambda t: t.mean(1), c=nn.Linear(8, 3)),
        lambda: torch.randint(0, 20, (2, 5)), {"e": (8, True), "c": (3, False)}, {"e": keep(8, 7)},
        shapes={"e.weight": (20, 7), "c.weight": (3, 7)},
    ),
}


@pytest.mark.parametrize("case", cases(LINEAR))
def test_linear_and_embedding(case):
    check_case(case)


# --------------------------------------------------------------------------------------------
# norm.py: BatchNorm / InstanceNorm per channel; LayerNorm / GroupNorm across channels


def conv_norm(norm: nn.Module) -> Callable[[], nn.Module]:
    return lambda: seq(a=nn.Conv2d(3, 8, 3, padding=1), n=norm, r=nn.ReLU(), c=nn.Conv2d(8, 4, 1))


PER_CHANNEL = {"a": (8, True), "c": (4, False)}
NORM = {
    "batchnorm2d": Case(
        conv_norm(nn.BatchNorm2d(8)), X, PER_CHANNEL, {"a": keep(8, 1, 6)},
        shapes={"n.weight": (6,), "n.bias": (6,), "n.running_mean": (6,), "n.running_var": (6,), "c.weight": (4, 6, 1, 1)},
        attrs={"n.num_features": 6},
    ),
    "batchnorm2d-no-affine": Case(
        conv_norm(nn.BatchNorm2d(8, affine=False)), X, PER_CHANNEL, {"a": keep(8, 2)},
        shapes={"n.running_mean": (7,), "n.running_var": (7,)}, attrs={"n.num_features": 7},
    ),
    "batchnorm2d-no-stats": Case(
        conv_norm(nn.BatchNorm2d(8, track_running_stats=False)), X, PER_CHANNEL, {"a": keep(8, 2)},
        shapes={"n.weight": (7,), "n.bias": (7,)}, attrs={"n.num_features": 7},
    ),
    "instancenorm2d-affine-stats": Case(
        conv_norm(nn.InstanceNorm2d(8, affine=True, track_running_stats=True)), X, PER_CHANNEL, {"a": keep(8, 2)},
        shapes={"n.weight": (7,), "n.running_mean": (7,)}, attrs={"n.num_features": 7},
    ),
    "instancenorm2d-affine": Case(
        conv_norm(nn.InstanceNorm2d(8, affine=True)), X, PER_CHANNEL, {"a": keep(8, 2)},
        shapes={"n.weight": (7,), "n.bias": (7,)}, attrs={"n.num_features": 7},
    ),
    "instancenorm2d-plain": Case(
        conv_norm(nn.InstanceNorm2d(8)), X, PER_CHANNEL, {"a": keep(8, 2)}, attrs={"n.num_features": 7}),
    "layernorm-over-channels": Case(
        lambda: seq(a=nn.Linear(10, 16), n=nn.LayerNorm(16), c=nn.Linear(16, 3)), img(4, 10),
        {"a": (16, False), "c": (3, False)},
        reasons={"a": ["not exactly prunable", "LayerNorm module 'n'", "normalises over channels"]},
    ),
    "layernorm-channels-last": Case(
        lambda: seq(a=nn.Conv2d(3, 8, 1), p=lambda t: t.permute(0, 2, 3, 1), n=nn.LayerNorm(8),
                    q=lambda t: t.permute(0, 3, 1, 2), c=nn.Conv2d(8, 4, 1)), X,
        {"a": (8, False), "c": (4, False)}, reasons={"a": ["not exactly prunable", "LayerNorm module 'n'"]},
    ),
    "layernorm-over-spatial": Case(  # normalising H, W of each channel alone keeps channels independent
        conv_norm(nn.LayerNorm([6, 6], elementwise_affine=False)), X, PER_CHANNEL, {"a": keep(8, 3)},
        shapes={"a.weight": (7, 3, 3, 3), "c.weight": (4, 7, 1, 1)},
    ),
    "layernorm-over-width": Case(  # normalising W of each row alone keeps channels independent
        conv_norm(nn.LayerNorm(6, elementwise_affine=False)), X, PER_CHANNEL, {"a": keep(8, 3)},
        shapes={"a.weight": (7, 3, 3, 3), "c.weight": (4, 7, 1, 1)},
    ),
    "layernorm-over-width-affine": Case(  # a removed channel becomes the bias along W: kept (zeroed), reported
        conv_norm(nn.LayerNorm(6)), X, PER_CHANNEL, {"a": keep(8, 3)},
        shapes={"a.weight": (8, 3, 3, 3), "c.weight": (4, 8, 1, 1)},
        check=reported(("kept", "a", 3, "c")),
    ),
    "groupnorm": Case(
        conv_norm(nn.GroupNorm(2, 8)), X, {"a": (8, False), "c": (4, False)},
        reasons={"a": ["not exactly prunable", "GroupNorm module 'n'", "normalises over groups of channels"]},
    ),
    "groupnorm-couples-through-add": Case(
        lambda: Two(torch.add, nn.Conv2d(3, 8, 1), seq(b=nn.Conv2d(3, 8, 1), n=nn.GroupNorm(4, 8)), nn.Conv2d(8, 4, 1)),
        X, {"a": (8, False), "c": (4, False)}, reasons={"a": "GroupNorm module 'b.n'"},
    ),
}


@pytest.mark.parametrize("case", cases(NORM))
def test_norm(case):
    check_case(case)


class FunctionalNorm(nn.Module):
    """A normalisation called as a function on the model's own per-channel tensors."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.a, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.w = nn.Parameter(torch.rand(8) + 0.5)
        self.b = nn.Parameter(torch.rand(8) - 0.5)
        self.register_buffer("rm", torch.rand(8) - 0.5)
        self.register_buffer("rv", torch.rand(8) + 0.5)

    def forward(self, x):
        y = self.a(x)
        if self.kind == "F.batch_norm":
            y = F.batch_norm(y, self.rm, self.rv, self.w, self.b, training=False)
        elif self.kind == "F.instance_norm":
            y = F.instance_norm(y, weight=self.w, bias=self.b)
        elif self.kind == "F.group_norm":
            y = F.group_norm(y, 2, self.w, self.b)
        else:
            y = F.layer_norm(y.permute(0, 2, 3, 1), (8,), self.w, self.b).permute(0, 3, 1, 2)
        return self.c(F.relu(y))


@pytest.mark.parametrize("kind, shapes", [
    ("F.batch_norm", {"w": (6,), "b": (6,), "rm": (6,), "rv": (6,)}), ("F.instance_norm", {"w": (6,), "b": (6,)}),
])
def test_functional_per_channel_norm(kind, shapes):
    check_case(Case(
        lambda: FunctionalNorm(kind), X, PER_CHANNEL, {"a": keep(8, 1, 6)}, shapes={**shapes, "c.weight": (4, 6, 1, 1)},
        check=lambda model, an, small: torch.testing.assert_close(small.w, model.w[[0, 2, 3, 4, 5, 7]], rtol=0, atol=0),
    ))


@pytest.mark.parametrize("kind", ["F.group_norm", "F.layer_norm"])
def test_functional_norm_across_channels_is_not_exactly_prunable(kind):
    check_case(Case(
        lambda: FunctionalNorm(kind), X, {"a": (8, False), "c": (4, False)},
        reasons={"a": ["not exactly prunable", kind[2:], "normalises over channels"]},
    ))


# --------------------------------------------------------------------------------------------
# activation.py: element-wise ops, dropout, identity, dtype casts


ELEMENTWISE = {
    "ReLU": nn.ReLU(), "ReLU6": nn.ReLU6(), "LeakyReLU": nn.LeakyReLU(0.1), "ELU": nn.ELU(), "SELU": nn.SELU(),
    "CELU": nn.CELU(), "GELU": nn.GELU(), "SiLU": nn.SiLU(), "Mish": nn.Mish(), "Sigmoid": nn.Sigmoid(),
    "Tanh": nn.Tanh(), "Hardtanh": nn.Hardtanh(), "Hardswish": nn.Hardswish(), "Hardsigmoid": nn.Hardsigmoid(),
    "Softplus": nn.Softplus(), "Softsign": nn.Softsign(), "LogSigmoid": nn.LogSigmoid(), "Tanhshrink": nn.Tanhshrink(),
    "Threshold": nn.Threshold(0.1, 2.0), "PReLU-shared": nn.PReLU(),
    "Identity": nn.Identity(), "Dropout": nn.Dropout(0.3), "Dropout2d": nn.Dropout2d(), "AlphaDropout": nn.AlphaDropout(),
    "FeatureAlphaDropout": nn.FeatureAlphaDropout(),
    "F.relu": F.relu, "F.relu_": lambda t: F.relu_(t), "F.relu6": F.relu6, "F.leaky_relu": lambda t: F.leaky_relu(t, 0.2),
    "F.elu": F.elu, "F.selu": F.selu, "F.celu": F.celu, "F.gelu-tanh": lambda t: F.gelu(t, approximate="tanh"),
    "F.silu": F.silu, "F.mish": F.mish, "F.sigmoid": F.sigmoid, "F.tanh": F.tanh, "F.hardtanh": F.hardtanh,
    "F.hardswish": F.hardswish, "F.hardsigmoid": F.hardsigmoid, "F.softplus": F.softplus, "F.softsign": F.softsign,
    "F.logsigmoid": F.logsigmoid, "F.hardshrink": F.hardshrink,
    "F.dropout": lambda t: F.dropout(t, 0.5, training=False), "F.dropout2d": lambda t: F.dropout2d(t, training=False),
    "F.alpha_dropout": lambda t: F.alpha_dropout(t, 0.2, training=False),
    "torch.relu": torch.relu, "torch.sigmoid": torch.sigmoid, "torch.tanh": torch.tanh, "torch.exp": torch.exp,
    "torch.abs": torch.abs, "torch.neg": torch.neg, "torch.sqrt": lambda t: torch.sqrt(t.abs()),
    "torch.square": torch.square, "torch.clamp": lambda t: torch.clamp(t, -0.2, 0.3),
    "torch.clip": lambda t: torch.clip(t, min=0.1), "-x": lambda t: -t, "+x": lambda t: +t, "abs(x)": lambda t: abs(t),
    "Tensor.relu": lambda t: t.relu(), "Tensor.relu_": lambda t: t.relu_(), "Tensor.sigmoid": lambda t: t.sigmoid(),
    "Tensor.tanh_": lambda t: t.tanh_(), "Tensor.exp": lambda t: t.exp(), "Tensor.abs": lambda t: t.abs(),
    "Tensor.neg": lambda t: t.neg(), "Tensor.square": lambda t: t.square(), "Tensor.clamp": lambda t: t.clamp(min=0),
    "Tensor.clamp_": lambda t: t.clamp_(max=0.5), "Tensor.clip": lambda t: t.clip(-1, 1),
    "Tensor.sqrt": lambda t: (t * t).sqrt(),
    "Tensor.contiguous": lambda t: t.contiguous(), "Tensor.clone": lambda t: t.clone(), "Tensor.detach": lambda t: t.detach(),
    "Tensor.requires_grad_": lambda t: t.detach().requires_grad_(),
    "cast double-float": lambda t: t.double().float(), "cast half-float": lambda t: t.half().float(),
    "cast bfloat16-float": lambda t: t.bfloat16().float(),
    "cast to(dtype)": lambda t: t.to(torch.float64).to(torch.float32), "cast type(dtype)": lambda t: t.type(torch.float32),
    "cast type_as": lambda t: t.double().type_as(t),
}


@pytest.mark.parametrize("fn", list(ELEMENTWISE.values()), ids=list(ELEMENTWISE))
def test_elementwise(fn):
    check_case(Case(
        lambda: seq(a=nn.Conv2d(3, 8, 1), f=fn, c=nn.Conv2d(8, 4, 1)), X, PER_CHANNEL, {"a": keep(8, 1, 6)},
        shapes={"a.weight": (6, 3, 1, 1), "c.weight": (4, 6, 1, 1)},
    ))


def test_prelu_per_channel_weights_follow_their_channels():
    model, an, small = check_case(Case(
        lambda: seq(a=nn.Conv2d(3, 8, 1), p=nn.PReLU(8), c=nn.Conv2d(8, 4, 1)), X, PER_CHANNEL, {"a": keep(8, 1, 6)},
        shapes={"p.weight": (6,)}, attrs={"p.num_parameters": 6},
    ))
    torch.testing.assert_close(small.p.weight, model.p.weight[[0, 2, 3, 4, 5, 7]], rtol=0, atol=0)
    assert any(m.name == "p.weight" for m in an.group("a").members)


def test_prelu_per_channel_after_linear():
    check_case(Case(
        lambda: seq(a=nn.Linear(5, 8), p=nn.PReLU(8), c=nn.Linear(8, 4)), img(4, 5), {"a": (8, True), "c": (4, False)},
        {"a": keep(8, 0)}, shapes={"p.weight": (7,), "c.weight": (4, 7)},
    ))


def test_constant_after_activation_is_folded():
    """sigmoid(0) = 0.5 at a removed channel: folded into the 1x1 consumer's bias, still exact."""
    _, _, small = check_case(Case(
        lambda: seq(a=nn.Conv2d(3, 8, 1), f=nn.Sigmoid(), c=nn.Conv2d(8, 4, 1, bias=False)), X, PER_CHANNEL,
        {"a": keep(8, 2)}, shapes={"c.weight": (4, 7, 1, 1), "c.bias": (4,)},
    ))
    assert [(a.action, a.group, a.channel, a.consumer) for a in small.meta["fxprune_report"]] == [("folded", "a", 2, "c")]


# --------------------------------------------------------------------------------------------
# arithmetic.py: broadcasting binary ops


def two_convs(op: Callable, cb: int = 8) -> Callable[[], nn.Module]:
    return lambda: Two(op, nn.Conv2d(3, 8, 1), nn.Conv2d(3, cb, 1), nn.Conv2d(8, 4, 1))


def _iadd(a, b):
    a += b
    return a


COUPLING_OPS = {
    "a+b": operator.add, "a-b": operator.sub, "a*b": operator.mul, "a+=b": _iadd,
    "torch.add": torch.add, "torch.add-alpha": lambda a, b: torch.add(a, b, alpha=0.5), "torch.sub": torch.sub,
    "torch.mul": torch.mul, "torch.subtract": torch.subtract, "torch.multiply": torch.multiply,
    "Tensor.add": lambda a, b: a.add(b), "Tensor.add_": lambda a, b: a.add_(b), "Tensor.sub": lambda a, b: a.sub(b),
    "Tensor.sub_": lambda a, b: a.sub_(b), "Tensor.mul": lambda a, b: a.mul(b), "Tensor.mul_": lambda a, b: a.mul_(b),
}


@pytest.mark.parametrize("op", list(COUPLING_OPS.values()), ids=list(COUPLING_OPS))
def test_elementwise_binary_couples_operands(op):
    check_case(Case(
        two_convs(op), X, PER_CHANNEL, {"a": keep(8, 1, 6)},
        shapes={"a.weight": (6, 3, 1, 1), "b.weight": (6, 3, 1, 1), "b.bias": (6,), "c.weight": (4, 6, 1, 1)},
        check=producers_are("a", ["a", "b"]),
    ))


DIVISIONS = {
    "a/b": operator.truediv, "torch.div": torch.div, "torch.true_divide": torch.true_divide,
    "Tensor.div": lambda a, b: a.div(b), "Tensor.div_": lambda a, b: a.div_(b),
    "Tensor.true_divide": lambda a, b: a.true_divide(b),
}


@pytest.mark.parametrize("op", list(DIVISIONS.values()), ids=list(DIVISIONS))
def test_dividing_by_channels_is_flagged(op):
    check_case(Case(
        two_convs(lambda a, b: op(a, b.abs() + 1)), X, {"a": (8, False), "c": (4, False)},
        reasons={"a": "divides by channel values"},
    ))


@pytest.mark.parametrize("fn", [lambda t: 1 / t, lambda t: torch.div(1.0, t)], ids=["1/y", "torch.div(1, y)"])
def test_scalar_divided_by_channels_is_flagged(fn):
    check_case(Case(take(fn, 8), X, {"a": (8, False), "c": (4, False)}, reasons={"a": "divides by channel values"}))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.f1, self.f2, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        gate = torch.sigmoid(self.f2(F.relu(self.f1(F.adaptive_avg_pool2d(y, 1)))))
        return self.c(y * gate)


class SpatialGate(nn.Module):
    """A single-channel attention map broadcast over every channel."""

    def __init__(self):
        super().__init__()
        self.a, self.s, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 1, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.c(y * torch.sigmoid(self.s(y)))


class Biased(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.p = nn.Parameter(torch.randn(1, 8, 1, 1))

    def forward(self, x):
        return self.c(self.a(x) * 2.0 + self.p - 1 + 3 * self.a(x) / 4)


ARITHMETIC = {
    "squeeze-excite": Case(
        SqueezeExcite, X, {"a": (8, True), "f1": (2, True), "c": (4, False)}, {"a": keep(8, 1), "f1": keep(2, 0)},
        shapes={"a.weight": (7, 3, 1, 1), "f1.weight": (1, 7, 1, 1), "f2.weight": (7, 1, 1, 1), "f2.bias": (7,),
                "c.weight": (4, 7, 1, 1)},
        check=producers_are("a", ["a", "f2"]),
    ),
    "single-channel-gate": Case(
        SpatialGate, X, {"a": (8, True), "s": (1, True), "c": (4, False)}, {"a": keep(8, 1, 2)},
        shapes={"s.weight": (1, 6, 1, 1), "c.weight": (4, 6, 1, 1)}, check=producers_are("a", ["a"]),
    ),
    "both-broadcast": Case(  # (N, 8, 1, 1) * (N, 1, H, W): neither couples the other
        lambda: Two(lambda a, b: F.adaptive_avg_pool2d(a, 1) * b, nn.Conv2d(3, 8, 1), nn.Conv2d(3, 1, 1), nn.Conv2d(8, 4, 1)),
        X, {"a": (8, True), "b": (1, True), "c": (4, False)}, {"a": keep(8, 7)}, shapes={"c.weight": (4, 7, 1, 1)},
    ),
    "scalars-and-parameter": Case(
        Biased, X, {"a": (8, True), "c": (4, False)}, {"a": keep(8, 1, 6)},
        shapes={"p": (1, 6, 1, 1), "c.weight": (4, 6, 1, 1)}, check=producers_are("a", ["a", "p"]),
    ),
}


@pytest.mark.parametrize("case", cases(ARITHMETIC))
def test_arithmetic_broadcasting(case):
    check_case(case)


# --------------------------------------------------------------------------------------------
# concat.py: cat / stack / split / chunk / narrow / getitem


class Cat(nn.Module):
    def __init__(self, fn=lambda a, b: torch.cat([a, b], 1), cb=6, cc=10, consumer=None):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, cb, 1)
        self.c = consumer if consumer is not None else nn.Conv2d(cc, 5, 1)
        self.fn = fn

    def forward(self, x):
        return self.c(self.fn(self.a(x), self.b(x)))


class CatSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(5, 5, 1), nn.Conv2d(5, 5, 1)

    def forward(self, x):
        p, q = torch.split(torch.cat([self.a(x), self.b(x)], 1), 5, 1)
        return self.c(p) + self.d(q)


def add_halves(t):
    p, q = t.chunk(2, 1)
    return p + q


def take(fn: Callable, n_in: int) -> Callable[[], nn.Module]:
    """Conv a (8 channels) -> fn -> conv c reading ``n_in`` channels."""
    return lambda: seq(a=nn.Conv2d(3, 8, 1), f=fn, c=nn.Conv2d(n_in, 4, 1))


class Indexed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(2, 4, 1)
        self.register_buffer("idx", torch.tensor([0, 2]))

    def forward(self, x):
        return self.c(self.a(x)[:, self.idx])


CONCAT = {
    "cat-offsets": Case(  # two groups, not one: pruning channel 1 of b removes consumer column 4 + 1
        Cat, X, {"a": (4, True), "b": (6, True), "c": (5, False)}, {"b": keep(6, 1)},
        shapes={"b.weight": (5, 3, 1, 1), "a.weight": (4, 3, 1, 1), "c.weight": (5, 9, 1, 1)},
        check=columns_removed("c", [0, 1, 2, 3, 4, 6, 7, 8, 9]),
    ),
    "cat-both": Case(
        Cat, X, {"a": (4, True), "b": (6, True), "c": (5, False)}, {"a": keep(4, 3), "b": keep(6, 0, 5)},
        shapes={"c.weight": (5, 7, 1, 1)}, check=columns_removed("c", [0, 1, 2, 5, 6, 7, 8]),
    ),
    "torch.concat-negative-dim": Case(
        lambda: Cat(lambda a, b: torch.concat((b, a), dim=-3)), X, {"a": (4, True), "b": (6, True), "c": (5, False)},
        {"a": keep(4, 0)}, check=columns_removed("c", [0, 1, 2, 3, 4, 5, 7, 8, 9]),
    ),
    "torch.concatenate": Case(
        lambda: Cat(lambda a, b: torch.concatenate([a, b], 1)), X, {"a": (4, True), "b": (6, True), "c": (5, False)},
        {"b": keep(6, 5)}, check=columns_removed("c", list(range(9))),
    ),
    "cat-same-tensor-twice": Case(
        take(lambda t: torch.cat([t, t], 1), 16), X, PER_CHANNEL, {"a": keep(8, 1)},
        shapes={"c.weight": (4, 14, 1, 1)}, check=columns_removed("c", [i for i in range(16) if i not in (1, 9)]),
    ),
    "stack-new-dim-couples-positions": Case(
        lambda: Cat(lambda a, b: torch.stack([a, b], 2), cb=4, consumer=nn.Conv3d(4, 5, 1)), X,
        {"a": (4, True), "c": (5, False)}, {"a": keep(4, 2)},
        shapes={"a.weight": (3, 3, 1, 1), "b.weight": (3, 3, 1, 1), "c.weight": (5, 3, 1, 1, 1)},
        check=producers_are("a", ["a", "b"]),
    ),
    "stack-then-flatten": Case(
        lambda: Cat(lambda a, b: torch.stack([a, b], 1).flatten(1, 2), cb=4, cc=8), X,
        {"a": (4, True), "c": (5, False)}, {"a": keep(4, 1)}, shapes={"c.weight": (5, 6, 1, 1)},
        check=all_of(producers_are("a", ["a", "b"]), columns_removed("c", [0, 2, 3, 4, 6, 7])),
    ),
    "cat-then-split-across-inputs": Case(
        CatSplit, X, {"a": (4, True), "b": (6, True), "c": (5, False)}, {"a": keep(4, 1), "b": keep(6, 1)},
        shapes={"c.weight": (5, 4, 1, 1), "d.weight": (5, 4, 1, 1)},
    ),
    "chunk-halves-added": Case(  # channels i and i + 4 meet in the add: units are pairs
        take(add_halves, 4), X, {"a": (4, True), "c": (4, False)}, {"a": keep(4, 1)},
        shapes={"a.weight": (6, 3, 1, 1), "c.weight": (4, 3, 1, 1)},
    ),
    "integer-index": Case(
        lambda: Cat(lambda a, b: torch.cat([a, b], 1) * b[:, 2].unsqueeze(1)), X,
        {"a": (4, True), "b": (6, False), "c": (5, False)}, {"a": keep(4, 0)},
        reasons={"b": "channel selected by an integer index"},
    ),
    "Tensor.select": Case(
        take(lambda t: t * t.select(1, 2).unsqueeze(1), 8), X, {"a": (8, False), "c": (4, False)},
        reasons={"a": ["channel selected by an integer index", "Tensor.select"]},
    ),
    "integer-index-spatial": Case(  # an integer index on a dim without channels selects nothing
        lambda: seq(a=nn.Conv2d(3, 8, 1), f=lambda t: t[:, :, 0, -1], c=nn.Linear(8, 4)), X,
        PER_CHANNEL, {"a": keep(8, 1)}, shapes={"c.weight": (4, 7)},
    ),
    "step-slice": Case(
        take(lambda t: t[:, ::2], 4), X, {"a": (8, False), "c": (4, False)}, reasons={"a": "slices channels with step 2"},
    ),
    "tensor-index-buffer": Case(  # an integer buffer is an index, never a channel producer
        Indexed, X, {"a": (8, False), "c": (4, False)}, reasons={"a": ["getitem", "with a tensor"]},
    ),
    "list-index": Case(  # the list is not rewritten: the channels it names are a boundary
        take(lambda t: t[:, [0, 2]], 2), X, {"a": (8, False), "c": (4, False)},
        reasons={"a": ["getitem", "indexes with a tensor or list"]},
    ),
    "single-channel-slice-broadcast": Case(  # removing channel 2 would empty the slice
        take(lambda t: t * t[:, 2:3], 8), X, {"a": (8, False), "c": (4, False)},
        reasons={"a": "one channel sliced out"},
    ),
    "unbind-getitem": Case(
        take(lambda t: t.unbind(1)[3].unsqueeze(1), 1), X, {"a": (8, False), "c": (4, False)},
        reasons={"a": ["Tensor.unbind", "splits channels at fixed positions"]},
    ),
    "torch.unbind": Case(
        take(lambda t: torch.unbind(t, dim=1)[3].unsqueeze(1), 1), X, {"a": (8, False), "c": (4, False)},
        reasons={"a": ["unbind", "splits channels at fixed positions"]},
    ),
    "tensor_split": Case(
        take(lambda t: torch.tensor_split(t, [3], dim=1)[1], 5), X, {"a": (8, False), "c": (4, False)},
        reasons={"a": ["tensor_split", "splits channels at fixed positions"]},
    ),
    "Tensor.tensor_split": Case(
        take(lambda t: t.tensor_split([3], 1)[1], 5), X, {"a": (8, False), "c": (4, False)},
        reasons={"a": ["tensor_split", "splits channels at fixed positions"]},
    ),
}


SLICES = {
    "split-int": (lambda t: torch.split(t, 4, 1)[1], 4, 4),
    "split-sections": (lambda t: t.split([3, 5], dim=1)[1], 3, 5),
    "split-kwarg-dim": (lambda t: torch.split(t, [2, 6], dim=1)[1], 2, 6),
    "Tensor.chunk": (lambda t: t.chunk(2, 1)[1], 4, 4),
    "torch.chunk": (lambda t: torch.chunk(t, 4, dim=1)[2], 4, 2),
    "Tensor.narrow": (lambda t: t.narrow(1, 2, 4), 2, 4),
    "torch.narrow": (lambda t: torch.narrow(t, 1, 3, 5), 3, 5),
    "slice": (lambda t: t[:, 2:6], 2, 4),
    "slice-ellipsis": (lambda t: t[..., 2:6, :, :], 2, 4),
    "slice-negative": (lambda t: t[:, -6:-2], 2, 4),
    "slice-open-start": (lambda t: t[:, :5], 0, 5),
    "slice-open-end": (lambda t: t[:, 3:], 3, 5),
    "slice-with-none": (lambda t: t[:, None, 1:7].squeeze(1), 1, 6),
}


@pytest.mark.parametrize("inside", [True, False], ids=["drop-inside", "drop-outside"])
@pytest.mark.parametrize("spec", list(SLICES.values()), ids=list(SLICES))
def test_slicing_channels_shifts_offsets(spec, inside):
    fn, start, length = spec
    drop = start + 1 if inside else (start - 1 if start > 0 else start + length)
    kept = [i for i in range(length) if start + i != drop]
    check_case(Case(
        take(fn, length), X, PER_CHANNEL, {"a": keep(8, drop)},
        shapes={"a.weight": (7, 3, 1, 1), "c.weight": (4, len(kept), 1, 1)}, check=columns_removed("c", kept),
    ))


@pytest.mark.parametrize("case", cases(CONCAT))
def test_concat_split_index(case):
    check_case(case)


# --------------------------------------------------------------------------------------------
# reshape.py: flatten / view / reshape / permute / shuffles


def into_linear(fn: Callable) -> Callable[[], nn.Module]:
    """Conv a (4 channels of 3x3) -> fn -> Linear(36, 5)."""
    return lambda: seq(a=nn.Conv2d(3, 4, 3), f=fn, l=nn.Linear(36, 5))


FLATTENS = {
    "torch.flatten": lambda t: torch.flatten(t, 1), "Tensor.flatten": lambda t: t.flatten(1), "nn.Flatten": nn.Flatten(),
    "view-size": lambda t: t.view(t.size(0), -1), "view-literal": lambda t: t.view(-1, 4 * 3 * 3),
    "reshape-literal": lambda t: t.reshape(2, 36), "torch.reshape": lambda t: torch.reshape(t, (-1, 36)),
    "view-via-3d": lambda t: t.view(2, 4, 9).view(2, 36), "view_as": lambda t: t.flatten(2).view_as(t).flatten(1),
    "reshape_as": lambda t: t.flatten(1).reshape_as(t).reshape(2, -1),
    "unflatten-flatten": lambda t: t.flatten(2).unflatten(2, (3, 3)).flatten(1),
}


@pytest.mark.parametrize("fn", list(FLATTENS.values()), ids=list(FLATTENS))
def test_flatten_into_linear_owns_spatial_features(fn):
    """Channel c of a (N, 4, 3, 3) map owns Linear columns 9c .. 9c + 8."""
    check_case(Case(
        into_linear(fn), lambda: torch.randn(2, 3, 5, 5), {"a": (4, True), "l": (5, False)}, {"a": keep(4, 1)},
        shapes={"a.weight": (3, 3, 3, 3), "l.weight": (5, 27)}, attrs={"l.in_features": 27},
        check=columns_removed("l", list(range(9)) + list(range(18, 36))),
    ))


PERMUTES = {
    "Tensor.permute": lambda t: t.permute(0, 2, 3, 1), "torch.permute": lambda t: torch.permute(t, (0, 2, 3, 1)),
    "Tensor.transpose": lambda t: t.transpose(1, 3), "torch.transpose": lambda t: torch.transpose(t, 1, -1),
    "movedim": lambda t: t.movedim(1, -1), "torch.movedim": lambda t: torch.movedim(t, 1, 3),
    "swapaxes": lambda t: t.swapaxes(1, 3), "torch.swapaxes": lambda t: torch.swapaxes(t, 3, 1),
    "flatten-transpose": lambda t: t.flatten(2).transpose(1, 2),
    "t-t": lambda t: t.flatten(2)[0].t().unsqueeze(0), "torch.t": lambda t: torch.t(t.flatten(1)).t().view(2, 4, 6, 6).permute(0, 2, 3, 1),
}


@pytest.mark.parametrize("fn", list(PERMUTES.values()), ids=list(PERMUTES))
def test_permute_into_channels_last_linear(fn):
    check_case(Case(
        lambda: seq(a=nn.Conv2d(3, 4, 1), f=fn, l=nn.Linear(4, 6)), X, {"a": (4, True), "l": (6, False)},
        {"a": keep(4, 1)}, shapes={"l.weight": (6, 3)}, check=columns_removed("l", [0, 2, 3]),
    ))


def shuffle_view(t):
    n, c, h, w = t.shape
    return t.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


def shuffle_literal(t):
    return t.view(2, 2, 4, 6, 6).transpose(1, 2).contiguous().view(2, 8, 6, 6)


def shuffle_unflatten(t):
    return t.unflatten(1, (2, 4)).transpose(1, 2).flatten(1, 2)


SHUFFLE = {"a": (4, True), "c": (4, False)}  # channels i and i + 4 form one unit: the grid stays 2 x k
SHUFFLES = {
    "view-transpose-reshape": shuffle_view, "literal-view": shuffle_literal, "unflatten-flatten": shuffle_unflatten,
}
SHUFFLES["nn.Unflatten"] = nn.Sequential(nn.Unflatten(1, (2, 4)), Fn(lambda t: t.transpose(1, 2).flatten(1, 2)))
MODULE_SHUFFLES = {
    "nn.ChannelShuffle": nn.ChannelShuffle(2), "F.channel_shuffle": lambda t: F.channel_shuffle(t, 2),
    "torch.channel_shuffle": lambda t: torch.channel_shuffle(t, 2),
}


@pytest.mark.parametrize(
    "fn", list(SHUFFLES.values()) + list(MODULE_SHUFFLES.values()), ids=list(SHUFFLES) + list(MODULE_SHUFFLES),
)
def test_channel_shuffle_stays_exact(fn):
    check_case(Case(
        lambda: seq(a=nn.Conv2d(3, 8, 1), f=fn, c=nn.Conv2d(8, 4, 1)), X, SHUFFLE, {"a": keep(4, 1)},
        shapes={"a.weight": (6, 3, 1, 1), "c.weight": (4, 6, 1, 1)}, check=columns_removed("c", [0, 1, 4, 5, 6, 7]),
    ))


@pytest.mark.parametrize("drop", [pytest.param([1, 5], id="1-5"), pytest.param([1, 2], id="1-2"),
                                  pytest.param([0, 7], id="0-7")])
@pytest.mark.parametrize("fn", list(MODULE_SHUFFLES.values()), ids=list(MODULE_SHUFFLES))
def test_channel_shuffle_module_is_exact_for_any_producer_mask(fn, drop):
    """An 8-entry mask of producer ``a``: exact whether units are channels or shuffle pairs."""
    torch.manual_seed(0)
    model = seq(a=nn.Conv2d(3, 8, 1), f=fn, c=nn.Conv2d(8, 4, 1)).eval()
    check_exact(model, X(), {"a": keep(8, *drop)})


PIXEL = {
    "nn.PixelShuffle": (nn.PixelShuffle(2), 16, 4), "F.pixel_shuffle": (lambda t: F.pixel_shuffle(t, 2), 16, 4),
}
PIXEL_UN = {
    "nn.PixelUnshuffle": (nn.PixelUnshuffle(2), 4, 16), "F.pixel_unshuffle": (lambda t: F.pixel_unshuffle(t, 2), 4, 16),
}


@pytest.mark.parametrize("spec", list(PIXEL.values()), ids=list(PIXEL))
def test_pixel_shuffle_units_are_blocks_of_r_squared(spec):
    fn, c_in, c_mid = spec
    model, _, small = check_case(Case(
        lambda: seq(a=nn.Conv2d(3, c_in, 1), f=fn, c=nn.Conv2d(c_mid, 4, 1)), X, {"a": (4, True), "c": (4, False)},
        {"a": keep(4, 1)}, shapes={"a.weight": (12, 3, 1, 1), "c.weight": (4, 3, 1, 1)},
        check=columns_removed("c", [0, 2, 3]),
    ))
    torch.testing.assert_close(small.a.weight, model.a.weight[[0, 1, 2, 3] + list(range(8, 16))], rtol=0, atol=0)


@pytest.mark.parametrize("spec", list(PIXEL_UN.values()), ids=list(PIXEL_UN))
def test_pixel_unshuffle_channel_owns_r_squared_columns(spec):
    fn, c_in, c_mid = spec
    check_case(Case(
        lambda: seq(a=nn.Conv2d(3, c_in, 1), f=fn, c=nn.Conv2d(c_mid, 4, 1)), X, {"a": (4, True), "c": (4, False)},
        {"a": keep(4, 1)}, shapes={"a.weight": (3, 3, 1, 1), "c.weight": (4, 12, 1, 1)},
        check=columns_removed("c", [0, 1, 2, 3] + list(range(8, 16))),
    ))


MOVES = {
    "flip-channels": lambda t: t.flip(1), "torch.flip": lambda t: torch.flip(t, [1, 2]),
    "unsqueeze-squeeze": lambda t: t.unsqueeze(2).squeeze(2), "torch.unsqueeze-squeeze": lambda t: torch.squeeze(torch.unsqueeze(t, 0), 0),
    "expand-literal": lambda t: t.mean((2, 3), keepdim=True).expand(2, 8, 6, 6) + t,
    "expand_as": lambda t: t.amax((2, 3), keepdim=True).expand_as(t) * t,
    "repeat-spatial": lambda t: t.repeat(1, 1, 2, 1), "roll-spatial": lambda t: torch.roll(t, 2, dims=3),
    "Tensor.roll-spatial": lambda t: t.roll((1, -2), (2, 3)),
}


@pytest.mark.parametrize("fn", list(MOVES.values()), ids=list(MOVES))
def test_moves_keep_channels(fn):
    check_case(Case(
        lambda: seq(a=nn.Conv2d(3, 8, 1), f=fn, c=nn.Conv2d(8, 4, 1)), X, PER_CHANNEL, {"a": keep(8, 7)},
        shapes={"c.weight": (4, 7, 1, 1)},
    ))


ROLLS = {
    "torch.roll": (lambda t: torch.roll(t, 1, dims=1), "roll"), "Tensor.roll": (lambda t: t.roll(1, 1), "Tensor.roll"),
    "roll-negative-dim": (lambda t: t.roll(-3, -3), "Tensor.roll"),
    "roll-flat": (lambda t: torch.roll(t.flatten(1), 5).view(2, 8, 6, 6), "roll"),  # no dims: rolls the flattened tensor
}


@pytest.mark.parametrize("spec", list(ROLLS.values()), ids=list(ROLLS))
def test_roll_over_channels_is_a_boundary(spec):
    """Removing a channel would change which channels wrap around."""
    fn, op = spec
    check_case(Case(
        lambda: seq(a=nn.Conv2d(3, 8, 1), f=fn, c=nn.Conv2d(8, 4, 1)), X, {"a": (8, False), "c": (4, False)},
        reasons={"a": [op, "rolls channels"]},
    ))


def test_repeat_channels_duplicates_columns():
    check_case(Case(
        take(lambda t: t.repeat(1, 2, 1, 1), 16), X, PER_CHANNEL, {"a": keep(8, 1)},
        check=columns_removed("c", [i for i in range(16) if i not in (1, 9)]),
    ))


# --------------------------------------------------------------------------------------------
# reduction.py: reductions and softmax


SPATIAL_REDUCTIONS = {
    "Tensor.mean": lambda t: t.mean((2, 3)), "torch.mean-dim-list": lambda t: torch.mean(t, dim=[2, 3]),
    "Tensor.sum-negative": lambda t: t.sum((-1, -2)), "torch.sum": lambda t: torch.sum(t, (2, 3)),
    "amax": lambda t: t.amax(dim=(2, 3)), "torch.amin": lambda t: torch.amin(t, (2, 3)),
    "keepdim-flatten": lambda t: t.mean((2, 3), keepdim=True).flatten(1),
    "max-dim-getitem": lambda t: t.flatten(2).max(dim=2)[0], "torch.min-dim": lambda t: torch.min(t.flatten(2), 2)[0],
    "std": lambda t: t.std(dim=(2, 3)), "torch.var": lambda t: torch.var(t, (2, 3)),
    "logsumexp": lambda t: torch.logsumexp(t.flatten(2), dim=2), "prod": lambda t: t.flatten(2).prod(2),
    "torch.norm": lambda t: torch.norm(t, dim=(2, 3)), "Tensor.norm": lambda t: t.norm(p=2, dim=(2, 3)),
    "mean-twice": lambda t: t.mean(3).mean(2),
    "max-values": lambda t: torch.max(t.flatten(2), 2).values,
    "min-values-indices": lambda t: (lambda r: r.values + r.indices.float())(t.flatten(2).min(2)),
}


@pytest.mark.parametrize("fn", list(SPATIAL_REDUCTIONS.values()), ids=list(SPATIAL_REDUCTIONS))
def test_spatial_reduction_keeps_channels(fn):
    check_case(Case(
        lambda: seq(a=nn.Conv2d(3, 8, 1), f=fn, l=nn.Linear(8, 4)), X, {"a": (8, True), "l": (4, False)},
        {"a": keep(8, 1, 6)}, shapes={"a.weight": (6, 3, 1, 1), "l.weight": (4, 6)}, attrs={"l.in_features": 6},
        check=columns_removed("l", [0, 2, 3, 4, 5, 7]),
    ))


CHANNEL_REDUCTIONS = {
    "mean-dim-1": (lambda t: t * t.mean(1, keepdim=True), "reduces across channels"),
    "sum-dim-1": (lambda t: t - torch.sum(t, dim=1, keepdim=True), "reduces across channels"),
    "amax-dim-1": (lambda t: t - t.amax(1, keepdim=True), "reduces across channels"),
    "mean-all": (lambda t: t - t.mean(), "reduces across channels"),
    "F.softmax-dim-1": (lambda t: F.softmax(t, dim=1), "normalises across channels"),
    "torch.softmax": (lambda t: torch.softmax(t, 1), "normalises across channels"),
    "Tensor.softmax": (lambda t: t.softmax(-3), "normalises across channels"),
    "Tensor.log_softmax": (lambda t: t.log_softmax(1), "normalises across channels"),
    "F.log_softmax": (lambda t: F.log_softmax(t, 1), "normalises across channels"),
    "nn.Softmax": (nn.Softmax(dim=1), "normalises across channels"),
    "nn.LogSoftmax": (nn.LogSoftmax(dim=1), "normalises across channels"),
    "nn.Softmax2d": (nn.Softmax2d(), "normalises across channels"),
}


@pytest.mark.parametrize("spec", list(CHANNEL_REDUCTIONS.values()), ids=list(CHANNEL_REDUCTIONS))
def test_reducing_over_channels_is_not_exactly_prunable(spec):
    fn, why = spec
    model, an, _ = check_case(Case(
        take(fn, 8), X, {"a": (an_size(fn), False), "c": (4, False)}, reasons={"a": ["not exactly prunable", why]},
    ))
    assert not an.group("a").exact


def an_size(fn) -> int:
    """Reductions over channels merge them into one unit; softmax leaves them apart."""
    torch.manual_seed(0)
    return fxprune.analyze(take(fn, 8)(), X()).group("a").size


def test_mask_over_channel_reduction_is_refused():
    model = take(lambda t: F.softmax(t, dim=1), 8)()
    with pytest.raises(fxprune.MaskError, match="not exactly prunable"):
        fxprune.compact(model, {"a": keep(8, 1)}, X())


SOFTMAX_SPATIAL = {
    "F.softmax-last": lambda t: F.softmax(t, dim=-1), "nn.Softmax-last": nn.Softmax(dim=3),
    "softmax-flat-spatial": lambda t: F.softmax(t.flatten(2), -1).view(2, 8, 6, 6),
}


@pytest.mark.parametrize("fn", list(SOFTMAX_SPATIAL.values()), ids=list(SOFTMAX_SPATIAL))
def test_softmax_over_spatial_dims_keeps_channels(fn):
    check_case(Case(take(fn, 8), X, PER_CHANNEL, {"a": keep(8, 4)}, shapes={"c.weight": (4, 7, 1, 1)}))


# --------------------------------------------------------------------------------------------
# pooling.py


POOLS = {
    "MaxPool2d": nn.MaxPool2d(2), "AvgPool2d": nn.AvgPool2d(3, stride=2, padding=1), "LPPool2d": nn.LPPool2d(2, 2),
    "AdaptiveAvgPool2d": nn.AdaptiveAvgPool2d(3), "AdaptiveMaxPool2d": nn.AdaptiveMaxPool2d((2, 3)),
    "Upsample": nn.Upsample(scale_factor=2), "UpsamplingBilinear2d": nn.UpsamplingBilinear2d(scale_factor=2),
    "UpsamplingNearest2d": nn.UpsamplingNearest2d(size=(7, 7)),
    "F.max_pool2d": lambda t: F.max_pool2d(t, 2), "F.avg_pool2d": lambda t: F.avg_pool2d(t, 2, padding=1),
    "F.adaptive_avg_pool2d": lambda t: F.adaptive_avg_pool2d(t, 1), "F.adaptive_max_pool2d": lambda t: F.adaptive_max_pool2d(t, 2),
    "F.lp_pool2d": lambda t: F.lp_pool2d(t, 2, 2),
    "F.interpolate-bilinear": lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False),
    "F.interpolate-size": lambda t: F.interpolate(t, size=(5, 5), mode="nearest"),
    "F.interpolate-bicubic": lambda t: F.interpolate(t, size=(9, 9), mode="bicubic", align_corners=True),
}


@pytest.mark.parametrize("fn", list(POOLS.values()), ids=list(POOLS))
def test_pooling_and_resampling_keep_channels(fn):
    check_case(Case(
        lambda: seq(a=nn.Conv2d(3, 8, 1), f=fn, c=nn.Conv2d(8, 4, 1)), img(2, 3, 8, 8), PER_CHANNEL,
        {"a": keep(8, 0, 5)}, shapes={"a.weight": (6, 3, 1, 1), "c.weight": (4, 6, 1, 1)},
    ))


POOLS_1D_3D = {
    "MaxPool1d": (nn.MaxPool1d(2), nn.Conv1d, img(2, 3, 8)), "AdaptiveAvgPool1d": (nn.AdaptiveAvgPool1d(3), nn.Conv1d, img(2, 3, 8)),
    "F.avg_pool1d": (lambda t: F.avg_pool1d(t, 2), nn.Conv1d, img(2, 3, 8)),
    "MaxPool3d": (nn.MaxPool3d(2), nn.Conv3d, img(2, 3, 4, 4, 4)), "AvgPool3d": (nn.AvgPool3d(2), nn.Conv3d, img(2, 3, 4, 4, 4)),
    "AdaptiveMaxPool3d": (nn.AdaptiveMaxPool3d(1), nn.Conv3d, img(2, 3, 4, 4, 4)),
}


@pytest.mark.parametrize("spec", list(POOLS_1D_3D.values()), ids=list(POOLS_1D_3D))
def test_pooling_1d_3d(spec):
    fn, conv, x = spec
    check_case(Case(lambda: seq(a=conv(3, 8, 1), f=fn, c=conv(8, 4, 1)), x, PER_CHANNEL, {"a": keep(8, 3)}))


# --------------------------------------------------------------------------------------------
# padding.py

SPATIAL_PADS = {
    "F.pad-reflect": lambda t: F.pad(t, (1, 1, 1, 1), mode="reflect"),
    "F.pad-replicate": lambda t: F.pad(t, (2, 2, 2, 2), mode="replicate"),
    "F.pad-circular": lambda t: F.pad(t, (1, 1, 1, 1), mode="circular"),
    "ReflectionPad2d": nn.ReflectionPad2d(1), "ReplicationPad2d": nn.ReplicationPad2d((1, 0, 2, 0)),
    "CircularPad2d": nn.CircularPad2d(1),
    "F.pad-constant-nonzero": lambda t: F.pad(t, (1, 1, 1, 1), value=3.0),  # removed channel is kept (reported)
    "ConstantPad2d-nonzero": nn.ConstantPad2d((1, 0, 1, 0), 0.5),
    "F.pad-constant": lambda t: F.pad(t, (1, 1, 2, 0)), "ZeroPad2d": nn.ZeroPad2d(1),
    "ConstantPad2d-zero": nn.ConstantPad2d(1, 0.0),
}


@pytest.mark.parametrize("fn", list(SPATIAL_PADS.values()), ids=list(SPATIAL_PADS))
def test_spatial_padding_keeps_channels(fn):
    check_case(Case(
        lambda: seq(a=nn.Conv2d(3, 8, 1), f=fn, c=nn.Conv2d(8, 4, 1)), X, PER_CHANNEL, {"a": keep(8, 1)},
    ))


CHANNEL_PADS = {  # (pad fn, entries before, entries after)
    "F.pad-channels": (lambda t: F.pad(t, (0, 0, 0, 0, 1, 2)), 1, 2),
    "F.pad-channels-value": (lambda t: F.pad(t, (0, 0, 0, 0, 2, 1), value=1.5), 2, 1),
    "ConstantPad3d-on-channels": (nn.ConstantPad3d((0, 0, 0, 0, 0, 3), 0.0), 0, 3),
}


@pytest.mark.parametrize("spec", list(CHANNEL_PADS.values()), ids=list(CHANNEL_PADS))
def test_constant_pad_on_channels_adds_non_channel_entries(spec):
    fn, before, after = spec
    n = 4 + before + after
    model, an, _ = check_case(Case(
        lambda: seq(a=nn.Conv2d(3, 4, 1), f=fn, c=nn.Conv2d(n, 5, 1)), X, {"a": (4, True), "c": (5, False)},
        {"a": keep(4, 1)}, shapes={"c.weight": (5, n - 1, 1, 1)},
        check=columns_removed("c", [i for i in range(n) if i != before + 1]),
    ))
    members = [m for m in an.group("a").members if m.name == "c.weight"]
    assert [m.index.tolist() for m in members] == [list(range(before, before + 4))]


# --------------------------------------------------------------------------------------------
# metadata.py: size / shape / dim / numel queries


class Queries(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.l = nn.Conv2d(3, 8, 1), nn.Linear(8, 4)

    def forward(self, x):
        y = self.a(x)
        n, c = y.shape[0], y.size(1)
        flat = torch.flatten(y, start_dim=y.ndimension() // 2, end_dim=-1)
        return self.l(y.reshape(n, c, y.size(-1) ** 2).mean(-1) * (y.numel() > 0) + flat.amax(-1))


class ShapeArithmetic(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.l = nn.Conv2d(3, 4, 3), nn.Linear(36, 5)

    def forward(self, x):
        y = self.a(x)
        return self.l(y.view(y.size(0), y.size(1) * y.size(2) * y.size(3)))


def test_shape_queries_follow_compaction():
    check_case(Case(
        Queries, X, {"a": (8, True), "l": (4, False)}, {"a": keep(8, 1, 2)}, shapes={"l.weight": (4, 6)},
    ))


def test_shape_arithmetic_on_python_ints():
    check_case(Case(
        ShapeArithmetic, lambda: torch.randn(2, 3, 5, 5), {"a": (4, True), "l": (5, False)}, {"a": keep(4, 1)},
        shapes={"l.weight": (5, 27)},
    ))


# --------------------------------------------------------------------------------------------
# no rule: boundaries, model outputs


class Custom(nn.Module):
    def forward(self, x):
        return x * 2


def test_unregistered_function_is_a_boundary_naming_the_op():
    model, an, _ = check_case(Case(
        two_convs(lambda a, b: torch.cumsum(a, dim=1) + b), X, {"a": (8, False), "b": (1, False), "c": (4, False)},
        reasons={"a": ["cumsum", "no channel rule"], "b": "cumsum"},
    ))


@pytest.mark.parametrize("leaf", ["cu", Custom], ids=["by-name", "by-type"])
def test_custom_leaf_module_is_a_boundary_naming_the_module(leaf):
    check_case(Case(
        lambda: seq(a=nn.Conv2d(3, 8, 1), cu=Custom(), c=nn.Conv2d(8, 4, 1)), X,
        {"a": (8, False), "c": (4, False)}, reasons={"a": ["Custom module 'cu'", "no channel rule"]},
        leaf_modules=(leaf,),
    ))


def test_traced_through_custom_module_is_not_a_boundary():
    check_case(Case(
        lambda: seq(a=nn.Conv2d(3, 8, 1), cu=Custom(), c=nn.Conv2d(8, 4, 1)), X, PER_CHANNEL, {"a": keep(8, 1)},
    ))


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 6, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.b(self.a(x))
        return {"logits": self.c(y), "pooled": y.mean((2, 3))}


def test_model_output_groups_are_not_prunable():
    model, an, small = check_case(Case(
        TwoOutputs, X, {"a": (8, True), "b": (6, False), "c": (4, False)}, {"a": keep(8, 3)},
        reasons={"b": OUTPUT, "c": OUTPUT},
    ))
    with pytest.raises(fxprune.MaskError, match=OUTPUT):
        fxprune.compact(model, {"b": keep(6, 0)}, X())


def test_model_input_channels_are_no_group():
    an = fxprune.analyze(seq(a=nn.Conv2d(3, 8, 1), c=nn.Conv2d(8, 4, 1)), X())
    assert [g.name for g in an.groups] == ["a", "c"]
    assert not any(m.name == "a.weight" and m.dim == 1 for g in an.groups for m in g.members)


# --------------------------------------------------------------------------------------------
# a module called twice


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1)
        self.s = nn.Conv2d(6, 8, 1)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c(torch.cat([self.s(self.a(x)), self.s(F.relu(self.b(x)))], 1))


class SharedNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.n, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.c(torch.cat([self.n(self.a(x)), self.n(self.b(x))], 1))


def test_module_called_twice_shares_its_output_channels():
    """Both call sites of ``s`` produce the same channels: pruning s.1 removes columns 1 and 9."""
    model = SharedConv()
    an = fxprune.analyze(model, X())
    assert an.group("s").size == 8 and an.group("s").prunable
    _, _, small = check_case(Case(
        SharedConv, X, table(an), {"s": keep(8, 1)}, shapes={"s.weight": (7, 6, 1, 1), "c.weight": (4, 14, 1, 1)},
        check=columns_removed("c", [i for i in range(16) if i not in (1, 9)]),
    ))


@pytest.mark.parametrize("model", [SharedConv, SharedNorm], ids=["conv", "batchnorm"])
def test_module_called_twice_couples_its_call_sites(model):
    torch.manual_seed(0)
    an = fxprune.analyze(model(), X())
    assert sorted(an.group("a").producers) == ["a", "b"], str(an)


@pytest.mark.parametrize("model", [SharedConv, SharedNorm], ids=["conv", "batchnorm"])
def test_module_called_twice_prunes_exactly(model):
    torch.manual_seed(0)
    m = randomize(model()).eval()
    an = fxprune.analyze(m, X())
    name = next(g.name for g in an.groups if "b" in g.producers)
    check_exact(m, X(), {name: keep(6, 1)}, analysis=an)


# --------------------------------------------------------------------------------------------
# literal view sizes are rewritten


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, 16 * 5 * 5)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def test_python_literal_view_size_is_rewritten():
    drop = [1, 7, 15]
    model, an, small = check_case(Case(
        LeNet, lambda: torch.randn(3, 1, 32, 32),
        {"conv1": (6, True), "conv2": (16, True), "fc1": (120, True), "fc2": (84, True), "fc3": (10, False)},
        {"conv2": keep(16, *drop), "conv1": keep(6, 0), "fc1": keep(120, *range(0, 120, 2))},
        shapes={"conv2.weight": (13, 5, 5, 5), "fc1.weight": (60, 13 * 25), "fc2.weight": (84, 60)},
        attrs={"fc1.in_features": 325, "conv2.in_channels": 5},
        check=lambda model, an, small: torch.testing.assert_close(
            small.fc1.weight, model.fc1.weight[1::2][:, [i for i in range(400) if i // 25 not in drop]], rtol=0, atol=0),
    ))
    view = next(n for n in small.graph.nodes if n.target == "view")
    assert 325 in view.args
    with torch.no_grad():  # the rewritten view keeps -1 for the batch: other batch sizes still work
        assert small(torch.randn(5, 1, 32, 32)).shape == (5, 10)


# --------------------------------------------------------------------------------------------
# every registered rule has a test above

TESTED_RULES = {
    "activation.elementwise": "test_elementwise, test_prelu_*",
    "arithmetic.arithmetic": "test_elementwise_binary_couples_operands, test_dividing_by_channels_is_flagged",
    "concat.move": "test_concat_split_index, test_slicing_channels_shifts_offsets",
    "concat.getitem": "test_concat_split_index, test_slicing_channels_shifts_offsets",
    "conv.conv": "test_conv",
    "embedding.embedding": "test_linear_and_embedding",
    "linear.linear": "test_linear_and_embedding",
    "metadata.query": "test_shape_queries_follow_compaction",
    "norm.batch_norm": "test_norm",
    "norm.layer_norm": "test_norm",
    "norm.group_norm": "test_norm",
    "norm.batch_norm_function": "test_functional_per_channel_norm",
    "norm.norm_function": "test_functional_norm_across_channels_is_not_exactly_prunable",
    "concat.cat": "test_concat_split_index[cat-*]",
    "concat.stack": "test_concat_split_index[stack-*]",
    "concat.split_by_position": "test_concat_split_index[*unbind*, *tensor_split]",
    "padding.pad": "test_spatial_padding_keeps_channels, test_constant_pad_on_channels_adds_non_channel_entries",
    "padding.pad_module": "test_spatial_padding_keeps_channels, test_constant_pad_on_channels_adds_non_channel_entries",
    "pooling.spatial": "test_pooling_and_resampling_keep_channels",
    "reduction.reduce": "test_spatial_reduction_keeps_channels, test_reducing_over_channels_is_not_exactly_prunable",
    "reduction.softmax": "test_reducing_over_channels_is_not_exactly_prunable",
    "reshape.move": "test_permute_into_channels_last_linear, test_moves_keep_channels, test_pixel_*",
    "reshape.move_module": "test_flatten_into_linear_owns_spatial_features, test_pixel_*",
    "reshape.split_dims": "test_flatten_into_linear_owns_spatial_features, test_channel_shuffle_stays_exact",
    "reshape.roll": "test_moves_keep_channels[*roll-spatial], test_roll_over_channels_is_a_boundary",
    "reshape.channel_shuffle": "test_channel_shuffle_stays_exact, test_channel_shuffle_module_is_exact_for_any_producer_mask",
    "recurrent.recurrent": "tests/test_recurrent.py: test_gate_blocks_are_sliced_per_unit, test_compact_equals_reference, "
                           "test_used_states_couple_every_layer, test_initial_state_*, test_tied_embedding_and_decoder",
    "recurrent.recurrent_cell": "tests/test_recurrent.py: test_unrolled_cell, test_initial_state_from_the_model_input_is_not_prunable",
    "metadata.sequence_length": "tests/test_attention.py::test_transformer_layers",
    "contraction.einsum": "tests/test_window_attention.py: test_maxvit_*, test_heads_split_by_a_reshape_*, "
                          "test_a_contraction_over_channels_that_may_be_non_zero_is_not_exact",
    "contraction.matmul": "tests/test_window_attention.py: test_swin_block_*, test_heads_split_by_a_reshape_*",
    "linear.linear_function": "tests/test_window_attention.py: test_swin_block_*, test_linear_function_*",
    "norm.normalize": "tests/test_window_attention.py: test_swin_block_*[*v2*]",
    "windows.relative_position_bias": "tests/test_window_attention.py: test_swin_block_*",
    "attention.scaled_dot_product_attention": "tests/test_window_attention.py: test_scaled_dot_product_attention_*",
    "windows.patch_merging": "tests/test_window_attention.py: test_swin_patch_merging_*",
    "attention.multihead_attention": "tests/test_attention.py",
}


def test_every_registered_rule_has_a_test():
    registered = {f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}" for fn in RULES.values()}
    assert registered - set(TESTED_RULES) == set(), "add tests for these new channel rules"


# --------------------------------------------------------------------------------------------
# constants created in forward, and indices along dims that keep every position


class ZeroState(nn.Module):
    """An LSTM whose initial state is created in forward, read at its last time step."""

    def __init__(self):
        super().__init__()
        self.lstm, self.fc = nn.LSTM(4, 6, num_layers=2, batch_first=True), nn.Linear(6, 3)

    def forward(self, x):
        h0 = torch.zeros(2, x.size(0), 6)
        c0 = torch.full((2, x.size(0), 6), 0.5)
        out, _ = self.lstm(x, (h0, c0))
        return self.fc(out[:, -1])


def test_created_constant_follows_the_channels_it_meets():
    torch.manual_seed(0)
    model = ZeroState().eval()
    x = torch.randn(3, 5, 4)
    an = fxprune.analyze(model, x)
    assert table(an) == {"lstm.hidden_l0": (6, True), "fc": (3, False)}  # the states couple both layers
    small, _ = check_exact(model, x, {"lstm.hidden_l0": keep(6, 1, 4)}, analysis=an)
    sizes = {n.target: n.args for n in small.graph.nodes if n.target in (torch.zeros, torch.full)}
    assert sizes[torch.zeros][2] == 4 and sizes[torch.full][0][2] == 4


def test_index_along_a_dim_that_keeps_every_position_stays_as_written():
    torch.manual_seed(0)
    model = ZeroState().eval()
    masks = {"lstm.hidden_l0": keep(6, 0)}
    small = fxprune.compact(model, masks, torch.randn(3, 5, 4))
    longer = torch.randn(3, 9, 4)  # out[:, -1] must still read the last step, not step 4
    with torch.no_grad():
        torch.testing.assert_close(small(longer), fxprune.apply_masks(model, masks, longer)(longer), rtol=1e-5, atol=1e-5)
