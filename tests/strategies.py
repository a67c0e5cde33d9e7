"""Hypothesis strategies: random small CNN architectures and random channel masks for them.

A model is described by a :class:`ModelSpec`, a tree of frozen "block spec" dataclasses, so that a
failing example prints as a readable program. ``ModelSpec.build()`` turns it into an ``nn.Module``
(:class:`SpecNet`, whose ``forward`` interprets the specs with Python loops only, so it is
FX-traceable) with deterministic, non-trivial weights, plus a fixed-size random input.

Profiles: "ci" (the default) and "large"; pick one with ``FXPRUNE_HYPOTHESIS_PROFILE=large``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.labels import compress

# --------------------------------------------------------------------------------------------
# Hypothesis profiles
# --------------------------------------------------------------------------------------------

_COMMON = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
# test_properties.py has 7 @given tests that each build one model per example (the composition
# test compacts it twice): 7 x 100 = 700 generated models in the "ci" profile, about a minute on
# two cores.
settings.register_profile("ci", max_examples=100, **_COMMON)
settings.register_profile("large", max_examples=2000, **_COMMON)
settings.register_profile("dev", max_examples=10, **_COMMON)
settings.load_profile(os.environ.get("FXPRUNE_HYPOTHESIS_PROFILE", "ci"))

MAX_C = 16  # channel counts stay in 1..MAX_C (a cat may briefly reach 2 * MAX_C)
MAX_HW = 12

SHUFFLE_STYLES = ("literal", "computed", "module", "functional")

# In-place activations also where the input may have other users (a standalone activation block,
# the first op of a branch, even the model input): compact's constant probe once read values that a
# later in-place op had changed (test_inplace_activation_on_a_shared_tensor).
SHARED_INPLACE = True
INPLACE = {"relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish,
           "leaky_relu": lambda inplace: nn.LeakyReLU(0.1, inplace=inplace)}
ACTIVATIONS = ("relu", "silu", "sigmoid", "hardswish", "gelu", "tanh", "leaky_relu", "identity")


# --------------------------------------------------------------------------------------------
# Block specs
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Conv:
    name: str
    cin: int
    cout: int
    k: int = 1
    stride: int = 1
    pad: int = 0
    bias: bool = True
    groups: int = 1
    dilation: int = 1
    padding_mode: str = "zeros"

    def make(self) -> nn.Module:
        return nn.Conv2d(self.cin, self.cout, self.k, self.stride, self.pad, self.dilation, self.groups,
                         bias=self.bias, padding_mode=self.padding_mode)


@dataclass(frozen=True)
class ConvT:
    name: str
    cin: int
    cout: int
    k: int = 2
    stride: int = 2
    pad: int = 0
    bias: bool = True
    groups: int = 1

    def make(self) -> nn.Module:
        return nn.ConvTranspose2d(self.cin, self.cout, self.k, self.stride, self.pad, bias=self.bias, groups=self.groups)


@dataclass(frozen=True)
class BN:
    name: str
    c: int
    affine: bool = True

    def make(self) -> nn.Module:
        return nn.BatchNorm2d(self.c, affine=self.affine)


@dataclass(frozen=True)
class Act:
    name: str
    kind: str
    inplace: bool = False

    def make(self) -> nn.Module:
        if self.kind in INPLACE:
            return INPLACE[self.kind](inplace=self.inplace)
        return {"sigmoid": nn.Sigmoid, "gelu": nn.GELU, "tanh": nn.Tanh, "identity": nn.Identity}[self.kind]()


@dataclass(frozen=True)
class Pool:
    name: str
    kind: str  # "max" | "avg"
    k: int
    stride: int
    pad: int

    def make(self) -> nn.Module:
        cls = nn.MaxPool2d if self.kind == "max" else nn.AvgPool2d
        return cls(self.k, self.stride, self.pad)


@dataclass(frozen=True)
class Linear:
    name: str
    fin: int
    fout: int
    bias: bool = True

    def make(self) -> nn.Module:
        return nn.Linear(self.fin, self.fout, bias=self.bias)


@dataclass(frozen=True)
class Residual:
    """``shortcut(x) + body(x)``; an empty shortcut is the identity."""

    body: tuple
    shortcut: tuple = ()
    shortcut_first: bool = True


@dataclass(frozen=True)
class Cat:
    """``cat([branch(x) for branch in branches], 1)``; an empty branch is the identity."""

    branches: tuple


@dataclass(frozen=True)
class Split:
    """Split channels into pieces, run one branch per piece, then combine every piece's result.

    ``how``: "chunk" (torch.chunk), "chunk_method" (x.chunk), "split" (torch.split with sizes),
    "slices" (x[:, a:b] per piece). ``combine``: "cat" in ``order``, or "add" (two equal pieces).
    """

    how: str
    sizes: tuple
    branches: tuple
    combine: str
    order: tuple


@dataclass(frozen=True)
class SE:
    """Squeeze-excite: ``x * gate(expand(act(reduce(pool(x)))))``."""

    pool: str  # "mean" | "adaptive"
    pool_name: str
    reduce: Conv
    act: Act
    expand: Conv
    gate: str  # "sigmoid" | "hardsigmoid"


@dataclass(frozen=True)
class Shuffle:
    """Channel shuffle with ``groups``; ``style`` picks view/transpose/reshape (literal or computed
    sizes), the ChannelShuffle module or torch.channel_shuffle."""

    groups: int
    style: str  # "literal" | "computed" | "module" | "functional"
    name: str
    n: int
    c: int
    h: int
    w: int


@dataclass(frozen=True)
class Slice:
    """``x[:, start:stop]`` (``None`` bounds allowed)."""

    start: int | None
    stop: int | None


@dataclass(frozen=True)
class Head:
    """Global pooling (or none: flatten the whole map, each channel owning H*W features), then
    flatten and one or two Linear layers."""

    pool: str  # "avg" | "max" | "mean" | "none" | "avg2" (AdaptiveAvgPool2d(2))
    pool_name: str
    flatten: str  # "torch" | "method" | "view" | "module"
    flatten_name: str
    n: int
    features: int
    linears: tuple  # Linear, or (Linear, Act, Linear)


Spec = Union[Conv, ConvT, BN, Act, Pool, Linear, Residual, Cat, Split, SE, Shuffle, Slice, Head]
LEAVES = (Conv, ConvT, BN, Act, Pool, Linear)


def leaves(specs) -> list:
    """Every spec that owns a module, depth first."""
    out = []
    for s in specs if isinstance(specs, tuple) else (specs,):
        if isinstance(s, LEAVES):
            out.append(s)
        elif isinstance(s, Residual):
            out += leaves(s.body) + leaves(s.shortcut)
        elif isinstance(s, (Cat, Split)):
            for b in s.branches:
                out += leaves(b)
        elif isinstance(s, SE):
            out += [s.reduce, s.act, s.expand]
        elif isinstance(s, Head):
            out += list(leaves(s.linears))
    return out


def named_modules(specs) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for s in specs if isinstance(specs, tuple) else (specs,):
        for leaf in leaves(s):
            out[leaf.name] = leaf.make()
        if isinstance(s, SE) and s.pool == "adaptive":
            out[s.pool_name] = nn.AdaptiveAvgPool2d(1)
        if isinstance(s, Shuffle) and s.style == "module":
            out[s.name] = nn.ChannelShuffle(s.groups)
        if isinstance(s, Head):
            if s.pool in ("avg", "max", "avg2"):
                out[s.pool_name] = {"avg": nn.AdaptiveAvgPool2d(1), "max": nn.AdaptiveMaxPool2d(1),
                                    "avg2": nn.AdaptiveAvgPool2d(2)}[s.pool]
            if s.flatten == "module":
                out[s.flatten_name] = nn.Flatten(1)
        for sub in _children(s):
            out.update(named_modules(sub))
    return out


def _children(s) -> list[tuple]:
    if isinstance(s, Residual):
        return [s.body, s.shortcut]
    if isinstance(s, (Cat, Split)):
        return list(s.branches)
    return []


# --------------------------------------------------------------------------------------------
# The interpreter module
# --------------------------------------------------------------------------------------------

class SpecNet(nn.Module):
    """A model whose forward interprets a tuple of block specs (FX-traceable: only Python loops
    over the specs, every size a Python constant or computed from ``Tensor.size``)."""

    def __init__(self, specs: tuple):
        super().__init__()
        self.specs = specs
        for name, m in named_modules(specs).items():  # qualified names: "s2.res5.conv7"
            *path, leaf = name.split(".")
            owner = self
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.add_module(leaf, m)

    def forward(self, x):
        return self._seq(self.specs, x)

    def _seq(self, specs: tuple, x):
        for s in specs:
            x = self._run(s, x)
        return x

    def _run(self, s, x):
        if isinstance(s, LEAVES):
            return self.get_submodule(s.name)(x)
        if isinstance(s, Residual):
            a, b = self._seq(s.shortcut, x), self._seq(s.body, x)
            return a + b if s.shortcut_first else b + a
        if isinstance(s, Cat):
            return torch.cat([self._seq(b, x) for b in s.branches], 1)
        if isinstance(s, Split):
            pieces = self._pieces(s, x)
            outs = [self._seq(b, p) for b, p in zip(s.branches, pieces)]
            if s.combine == "add":
                return outs[0] + outs[1]
            return torch.cat([outs[i] for i in s.order], 1)
        if isinstance(s, SE):
            g = x.mean((2, 3), keepdim=True) if s.pool == "mean" else self.get_submodule(s.pool_name)(x)
            g = self.get_submodule(s.expand.name)(self.get_submodule(s.act.name)(self.get_submodule(s.reduce.name)(g)))
            g = torch.sigmoid(g) if s.gate == "sigmoid" else F.hardsigmoid(g)
            return x * g
        if isinstance(s, Shuffle):
            if s.style == "module":
                return self.get_submodule(s.name)(x)
            if s.style == "functional":
                return torch.channel_shuffle(x, s.groups)
            if s.style == "literal":
                y = x.view(s.n, s.groups, s.c // s.groups, s.h, s.w).transpose(1, 2)
                return y.reshape(s.n, s.c, s.h, s.w)
            n, c = x.size(0), x.size(1)
            y = x.view(n, s.groups, c // s.groups, x.size(2), x.size(3)).transpose(1, 2).contiguous()
            return y.view(n, -1, x.size(2), x.size(3))
        if isinstance(s, Slice):
            return x[:, s.start:s.stop]
        if isinstance(s, Head):
            if s.pool in ("avg", "max", "avg2"):
                x = self.get_submodule(s.pool_name)(x)
            elif s.pool == "mean":
                x = x.mean((2, 3))
            if s.flatten == "torch":
                x = torch.flatten(x, 1)
            elif s.flatten == "method":
                x = x.flatten(1)
            elif s.flatten == "view":
                x = x.reshape(s.n, s.features)
            else:
                x = self.get_submodule(s.flatten_name)(x)
            return self._seq(s.linears, x)
        raise TypeError(f"unknown spec {s!r}")

    @staticmethod
    def _pieces(s: Split, x) -> list:
        if s.how == "chunk":
            parts = torch.chunk(x, len(s.sizes), 1)
        elif s.how == "chunk_method":
            parts = x.chunk(len(s.sizes), 1)
        elif s.how == "split":
            parts = torch.split(x, list(s.sizes), 1)
        else:
            bounds = [sum(s.sizes[:i]) for i in range(len(s.sizes) + 1)]
            return [x[:, a:b] for a, b in zip(bounds, bounds[1:])]
        return [parts[i] for i in range(len(s.sizes))]


@dataclass(frozen=True)
class ModelSpec:
    """A random architecture: blocks, input shape and the seed of every random number."""

    blocks: tuple
    n: int
    c: int
    h: int
    w: int
    seed: int
    out_shape: tuple = field(default=())

    def input(self, which: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 7 + 1 + which)
        return torch.randn(self.n, self.c, self.h, self.w, generator=g)

    def build(self) -> tuple[nn.Module, torch.Tensor]:
        """The model (eval mode, random non-trivial weights and statistics) and its example input."""
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = SpecNet(self.blocks)
            g = torch.Generator().manual_seed(self.seed + 12345)
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        c = m.num_features
                        sign = torch.where(torch.rand(c, generator=g) < 0.2, -1.0, 1.0)
                        if m.affine:
                            m.weight.copy_((torch.rand(c, generator=g) + 0.5) * sign)
                            m.bias.copy_(torch.randn(c, generator=g) * 0.5)
                        m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                        m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                        m.num_batches_tracked.fill_(int(torch.randint(1, 100, (), generator=g)))
                    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and m.bias is not None:
                        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
        return model.eval(), self.input(0)


# --------------------------------------------------------------------------------------------
# Architecture strategy
# --------------------------------------------------------------------------------------------

class _Builder:
    """Draws blocks while tracking the (C, H, W) of the running tensor."""

    def __init__(self, draw, n: int, shuffle_styles=SHUFFLE_STYLES):
        self.draw = draw
        self.n = n
        self.shuffle_styles = shuffle_styles
        self.prefix = ""  # modules live in nested containers, so that names have dots
        self.shuffled = False  # a shuffle came before: no "computed" one after it
        self.count = 0

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{self.prefix}{kind}{self.count}"

    def ints(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, max(lo, hi)))

    def flag(self, p_true: float = 0.5) -> bool:
        # Shrinks to False.
        return self.draw(st.integers(0, 99)) < int(p_true * 100)

    def pick(self, options):
        return self.draw(st.sampled_from(list(options)))

    # ---- leaves ----------------------------------------------------------------------------

    def conv(self, cin, cout, h, w, k=None, stride=1, same=False, groups=1):
        """A Conv2d (+ maybe BN, + maybe activation); returns (specs, h, w)."""
        if k is None:
            k = self.pick((1, 3)) if min(h, w) >= 3 or same else 1
        dil = 2 if k == 3 and min(h, w) >= 5 and self.flag(0.15) else 1
        pad = dil * (k // 2) if same or k == 1 else self.pick((0, dil))
        mode = "zeros"
        if pad and pad < min(h, w) and self.flag(0.2):
            mode = self.pick(("reflect", "replicate", "circular"))
        conv = Conv(self.name("conv"), cin, cout, k, stride, pad, self.flag(0.6), groups, dil, mode)
        h2, w2 = ((d + 2 * pad - dil * (k - 1) - 1) // stride + 1 for d in (h, w))
        specs = [conv]
        if self.flag(0.5):
            specs.append(self.bn(cout))
        if self.flag(0.6):
            specs.append(self.act(inplace=True))
        return specs, h2, w2

    def bn(self, c: int) -> BN:
        return BN(self.name("bn"), c, not self.flag(0.15))

    def act(self, kinds=ACTIVATIONS, inplace: bool = False) -> Act:
        """An activation; ``inplace`` allows an in-place one."""
        kind = self.pick(kinds)
        return Act(self.name("act"), kind, inplace and kind in INPLACE and self.flag(0.4))

    def channels(self, lo: int = 1) -> int:
        return self.ints(lo, MAX_C)

    # ---- blocks ----------------------------------------------------------------------------

    def block(self, c, h, w, depth: int, same: bool):
        """One random block; ``same`` keeps the spatial size. Returns (specs, c, h, w)."""
        kinds = ["conv", "bn", "act", "residual", "cat", "pool", "se", "grouped", "depthwise",
                 "split", "shuffle", "slice", "convT"]
        if depth <= 0:
            kinds = [k for k in kinds if k not in ("residual", "cat", "split")]
        if c < 2:
            kinds = [k for k in kinds if k not in ("split", "slice", "shuffle", "grouped")]
        if c % 2:
            kinds = [k for k in kinds if k != "shuffle"]
        kind = self.pick(kinds)
        if kind == "conv":
            stride = 1 if same or min(h, w) < 4 else self.pick((1, 2))
            specs, h, w = self.conv(c, self.channels(), h, w, stride=stride, same=same)
            return specs, specs[0].cout, h, w
        if kind == "bn":
            return [self.bn(c)], c, h, w
        if kind == "act":
            return [self.act(inplace=SHARED_INPLACE)], c, h, w
        if kind == "pool":
            if same or min(h, w) < 4 or self.flag(0.4):
                return [Pool(self.name("pool"), self.pick(("max", "avg")), 3, 1, 1)], c, h, w
            return [Pool(self.name("pool"), self.pick(("max", "avg")), 2, 2, 0)], c, h // 2, w // 2
        if kind == "residual":
            return self.residual(c, h, w, depth, same)
        if kind == "cat":
            return self.cat(c, h, w, depth)
        if kind == "split":
            return self.split(c, h, w, depth)
        if kind == "se":
            r = self.ints(1, max(1, c // 2))
            return [SE(self.pick(("mean", "adaptive")), self.name("sepool"),
                       Conv(self.name("se_reduce"), c, r, bias=self.flag(0.8)), self.act(("relu", "silu")),
                       Conv(self.name("se_expand"), r, c, bias=self.flag(0.8)), self.pick(("sigmoid", "hardsigmoid")))], c, h, w
        if kind == "grouped":
            divisors = [g for g in (2, 3, 4, 8) if c % g == 0]
            if not divisors:
                return [Act(self.name("act"), "relu")], c, h, w
            g = self.pick(divisors)
            cout = g * self.ints(1, MAX_C // g)
            specs, h, w = self.conv(c, cout, h, w, k=self.pick((1, 3)), same=True, groups=g)
            return specs, cout, h, w
        if kind == "depthwise":
            mult = self.pick((1, 2)) if 2 * c <= MAX_C else 1
            specs, h, w = self.conv(c, c * mult, h, w, k=3, same=True, groups=c)
            return specs, c * mult, h, w
        if kind == "shuffle":
            g = self.pick([g for g in (2, 4) if c % g == 0])
            # No "computed" view with one channel per group (c == g), nor after another shuffle:
            # compact then changes the groups count, which it cannot rewrite there
            # (test_computed_channel_shuffle, test_channel_shuffle_after_channel_shuffle).
            styles = [s for s in self.shuffle_styles if s != "computed" or (c > g and not self.shuffled)] or ["literal"]
            self.shuffled = True
            return [Shuffle(g, self.pick(styles), self.name("shuffle"), self.n, c, h, w)], c, h, w
        if kind == "slice":
            start = self.ints(0, c - 1)
            stop = self.ints(start + 1, c)
            start_s = None if start == 0 and self.flag() else start
            stop_s = None if stop == c and self.flag() else stop
            return [Slice(start_s, stop_s)], stop - start, h, w
        if kind == "convT":
            groups = self.pick([1] + [g for g in (2, 3, 4) if c % g == 0]) if self.flag(0.3) else 1
            cout = groups * self.ints(1, MAX_C // groups)
            bias = self.flag(0.6)
            if not same and 2 * max(h, w) <= MAX_HW and self.flag():
                return [ConvT(self.name("convT"), c, cout, 2, 2, 0, bias, groups)], cout, 2 * h, 2 * w
            return [ConvT(self.name("convT"), c, cout, 3, 1, 1, bias, groups)], cout, h, w
        raise AssertionError(kind)

    def body(self, cin, cout, h, w, depth, stride=1, force_conv=False):
        """A branch from ``cin`` to ``cout`` channels that keeps H, W (or applies ``stride``)."""
        specs = []
        c = cin
        if stride == 1 and not force_conv and self.flag(0.15):  # pre-activation branch
            specs.append(self.act(inplace=SHARED_INPLACE))
        if stride != 1 or force_conv or self.flag(0.6):
            first, h, w = self.conv(cin, self.channels(), h, w, k=self.pick((1, 3)), stride=stride, same=True)
            specs += first
            c = first[0].cout
        for _ in range(self.ints(0, 2)):
            more, c, h, w = self.block(c, h, w, depth - 1, same=True)
            specs += more
        if c != cout or self.flag(0.3):
            last, h, w = self.conv(c, cout, h, w, same=True)
            specs += last
        return tuple(specs), h, w

    def residual(self, c, h, w, depth, same):
        stride = 1 if same or min(h, w) < 4 else self.pick((1, 1, 2))
        cout = c if stride == 1 and self.flag(0.6) else self.channels()
        outer = self.prefix
        self.prefix = f"{outer}res{self.count}."
        if stride == 1 and cout >= 2 and self.flag(0.3):
            # x + cat([f(x), g(x)]): each branch's producer covers only part of the group
            split = self.ints(1, cout - 1)
            branches = tuple(self.body(c, n, h, w, depth - 1)[0] for n in (split, cout - split))
            body, h2, w2 = (Cat(branches),), h, w
        else:
            body, h2, w2 = self.body(c, cout, h, w, depth, stride=stride, force_conv=stride != 1)
        self.prefix = outer
        shortcut = ()
        if cout != c or stride != 1 or self.flag(0.2):
            proj = [Conv(self.name("proj"), c, cout, 1, stride, 0, self.flag(0.3))]
            if self.flag(0.5):
                proj.append(self.bn(cout))
            shortcut = tuple(proj)
        return [Residual(body, shortcut, self.flag())], cout, h2, w2

    def cat(self, c, h, w, depth):
        branches, total = [], 0
        n = self.ints(2, 3)
        for _ in range(n):
            if self.flag(0.25):
                branches.append(())
                total += c
            else:
                ci = self.ints(1, 8)
                b, _, _ = self.body(c, ci, h, w, depth)
                branches.append(b)
                total += ci
        return [Cat(tuple(branches))], total, h, w

    def split(self, c, h, w, depth):
        how = self.pick(("chunk", "chunk_method", "split", "slices"))
        if how.startswith("chunk"):
            k = self.pick((2, 2, 3)) if c >= 3 else 2
            size = -(-c // k)
            sizes = [size] * (c // size) + ([c % size] if c % size else [])
            if len(sizes) != k:  # torch.chunk returned fewer pieces: split by sizes instead
                how = "split"
        else:
            a = self.ints(1, c - 1)
            sizes = [a, c - a]
        sizes = tuple(sizes)
        combine = "add" if len(sizes) == 2 and self.flag(0.3) else "cat"
        if combine == "add":
            cout = self.channels()
            branches = tuple(self.body(s, cout, h, w, depth)[0] for s in sizes)
            return [Split(how, sizes, branches, "add", (0, 1))], cout, h, w
        branches, outs = [], []
        for s in sizes:
            if self.flag(0.4):
                branches.append(())
                outs.append(s)
            else:
                co = self.ints(1, 8)
                branches.append(self.body(s, co, h, w, depth)[0])
                outs.append(co)
        order = tuple(self.draw(st.permutations(range(len(sizes)))))
        return [Split(how, sizes, tuple(branches), "cat", order)], sum(outs), h, w

    def head(self, c, h, w):
        pool = self.pick(("avg", "max", "mean", "none", "avg2"))
        if pool == "avg2":  # each channel owns 2 x 2 features
            h = w = 2
        elif pool != "none":
            h = w = 1
        features = c * h * w
        flatten = self.pick(("torch", "method", "view", "module"))
        out = self.ints(1, 10)
        if self.flag(0.3):
            hidden = self.ints(2, MAX_C)
            linears = (Linear(self.name("fc"), features, hidden, self.flag(0.8)), self.act(),
                       Linear(self.name("fc"), hidden, out, self.flag(0.8)))
        else:
            linears = (Linear(self.name("fc"), features, out, self.flag(0.8)),)
        return Head(pool, self.name("gpool"), flatten, self.name("flatten"), self.n, features, linears), (self.n, out)


@st.composite
def model_specs(draw, max_blocks: int = 5, max_depth: int = 2, shuffle_styles=SHUFFLE_STYLES) -> ModelSpec:
    """A random small CNN (see the module docstring) as a :class:`ModelSpec`."""
    n = draw(st.integers(1, 2))
    c = draw(st.integers(1, 4))
    h = draw(st.integers(4, MAX_HW))
    w = draw(st.integers(4, MAX_HW))
    b = _Builder(draw, n, shuffle_styles)
    blocks = []
    cc, hh, ww = c, h, w
    if b.flag(0.8):  # usually a stem conv, so the channels after it are prunable
        specs, hh, ww = b.conv(cc, b.channels(2), hh, ww, same=b.flag())
        blocks += specs
        cc = specs[0].cout
    for i in range(draw(st.integers(1, max_blocks))):
        b.prefix = f"s{i}." if b.flag(0.5) else ""
        specs, cc, hh, ww = b.block(cc, hh, ww, max_depth, same=False)
        blocks += specs
    if b.flag(0.9):
        b.prefix = "head." if b.flag(0.5) else ""
        head, out_shape = b.head(cc, hh, ww)
        blocks.append(head)
    else:
        out_shape = (n, cc, hh, ww)
    seed = draw(st.integers(0, 2**31 - 1))
    return ModelSpec(tuple(blocks), n, c, h, w, seed, out_shape)


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------

def producer_units(analysis: fxprune.Analysis) -> dict[str, tuple[int, torch.Tensor]]:
    """For each producer (by name): its group's index and the unit of each of its channels."""
    out = {}
    for p in analysis.space.producers:
        found = [analysis.unit_of[int(r)] for r in analysis.roots[p.atoms]]
        out.setdefault(p.name, (found[0][0], torch.tensor([u for _, u in found], dtype=torch.long)))
    return out


def _kept_mask(draw, size: int) -> torch.Tensor:
    """A random bool mask of ``size`` entries with at least one True."""
    style = draw(st.sampled_from(("random", "prefix", "one", "all", "dense")))
    if style == "all":
        return torch.ones(size, dtype=torch.bool)
    if style == "one":
        m = torch.zeros(size, dtype=torch.bool)
        m[draw(st.integers(0, size - 1))] = True
        return m
    if style == "prefix":
        return torch.arange(size) < draw(st.integers(1, size))
    bits = draw(st.lists(st.booleans(), min_size=size, max_size=size))
    m = torch.tensor(bits, dtype=torch.bool)
    if style == "dense":
        m |= torch.arange(size) % 2 == 0
    if not m.any():
        m[draw(st.integers(0, size - 1))] = True
    return m


def group_votes(analysis: fxprune.Analysis, masks) -> list[torch.Tensor]:
    """The units each group keeps according to ``masks`` alone: a unit stays if some mask keeps
    it, or if no mask covers it (a group mask covers its whole group, a producer's mask the units
    of its channels). A key names a group when it is a group name of matching size, else a
    producing module."""
    groups = {g.name: i for i, g in enumerate(analysis.groups)}
    units = producer_units(analysis)
    votes = [torch.zeros(g.size, dtype=torch.bool) for g in analysis.groups]
    heard = [torch.zeros(g.size, dtype=torch.bool) for g in analysis.groups]
    for key, m in masks.items():
        gi = groups.get(key)
        if gi is not None and len(m) == analysis.groups[gi].size:
            votes[gi] |= m
            heard[gi][:] = True
        else:
            gi, u = units[key]
            votes[gi][u[m]] = True
            heard[gi][u] = True
    return [v | ~h for v, h in zip(votes, heard)]


def _label_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _label_tensors(v)]
    return []


def emptied_tensors(analysis: fxprune.Analysis, keep: list[torch.Tensor],
                    single_atom: bool = False) -> list[tuple[str, list[tuple[int, int]]]]:
    """The graph values that would lose every element if only the units in ``keep`` stayed:
    (node name, the (group, unit) pairs found in it). With ``single_atom``, only values whose
    every element carries the same label (a one-channel value)."""
    roots = analysis.roots
    out = []
    for name, value in analysis.labels.items():
        for t in _label_tensors(value):
            atoms = torch.unique(compress(t))
            if len(atoms) == 0 or bool((atoms < 0).any()) or (single_atom and len(atoms) > 1):
                continue
            where = [analysis.unit_of.get(int(r)) for r in roots[atoms]]
            if any(w is None or bool(keep[w[0]][w[1]]) for w in where):
                continue
            out.append((name, sorted(set(where))))
    return out


@dataclass
class DrawnMasks:
    """Masks for ``compact``/``apply_masks`` plus how they were drawn (for readable failures)."""

    masks: dict[str, torch.Tensor]
    by: dict[str, str]  # key -> "group" | "producer"

    def __repr__(self) -> str:
        items = ", ".join(f"{k!r} ({self.by[k]}): {v.int().tolist()}" for k, v in self.masks.items())
        return f"DrawnMasks({{{items}}})"


@st.composite
def masks_for(draw, analysis: fxprune.Analysis, producer_keys: bool = True, avoid_empty: bool | str = True) -> DrawnMasks:
    """Random masks over the prunable groups of ``analysis``.

    Per group: no mask, a group-keyed mask, or (if ``producer_keys``) masks keyed by producer
    module names, possibly disagreeing between coupled producers, possibly covering only part of
    the group (a producer that is one input of a cat). With ``avoid_empty``, masks never remove every
    element of a graph value (a producer's output, a slice, a split piece) while keeping some of
    its group (compact refuses those with a MaskError). ``avoid_empty="one-channel"`` avoids only
    emptying values that carry a single label.
    """
    units = producer_units(analysis)
    masks, by = {}, {}
    for gi, g in enumerate(analysis.groups):
        if not g.prunable:
            continue
        plist = [p for p in g.producers if units.get(p, (None,))[0] == gi and p not in by]
        choice = draw(st.sampled_from(("none", "group", "producers") if producer_keys else ("none", "group")))
        if choice == "producers" and plist:
            keyed = draw(st.lists(st.sampled_from(plist), min_size=1, max_size=len(plist), unique=True))
            for p in keyed:
                n = len(units[p][1])
                masks[p], by[p] = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool), "producer"
            if not group_votes(analysis, masks)[gi].any():
                masks[keyed[0]][draw(st.integers(0, len(masks[keyed[0]]) - 1))] = True
        elif choice in ("group", "producers"):
            masks[g.name], by[g.name] = _kept_mask(draw, g.size), "group"
    for _ in range(10_000 if avoid_empty else 0):
        empty = emptied_tensors(analysis, group_votes(analysis, masks), single_atom=avoid_empty == "one-channel")
        if not empty:
            break
        gi, ui = draw(st.sampled_from(empty[0][1]))
        g = analysis.groups[gi]
        if g.name in masks and len(masks[g.name]) == g.size:  # read as a group mask (see group_votes)
            masks[g.name][ui] = True
        else:  # some producer mask covers unit ui and removes it: keep it there
            p = next(k for k in masks if k in units and units[k][0] == gi and bool((units[k][1] == ui).any()))
            masks[p][units[p][1] == ui] = True
    else:
        assert not avoid_empty, "masks_for could not avoid emptied values"
    return DrawnMasks(masks, by)


# --------------------------------------------------------------------------------------------
# Sequence models: embedding or Linear stem, recurrent / attention / Linear blocks, Linear head
# --------------------------------------------------------------------------------------------

RNN_MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")


@dataclass(frozen=True)
class Embed:
    name: str
    vocab: int
    dim: int

    def make(self) -> nn.Module:
        return nn.Embedding(self.vocab, self.dim)


@dataclass(frozen=True)
class Recurrent:
    """An nn.LSTM / nn.GRU / nn.RNN; the block outputs its output sequence. If its ``batch_first``
    differs from the model's stream layout, the block transposes around it."""

    name: str
    mode: str  # one of RNN_MODES
    fin: int
    hidden: int
    num_layers: int = 1
    bidirectional: bool = False
    batch_first: bool = False
    bias: bool = True
    proj: int = 0  # LSTM only
    dropout: float = 0.0

    @property
    def fout(self) -> int:
        return (self.proj or self.hidden) * (2 if self.bidirectional else 1)

    def make(self) -> nn.Module:
        kw = dict(num_layers=self.num_layers, bias=self.bias, batch_first=self.batch_first,
                  dropout=self.dropout, bidirectional=self.bidirectional)
        if self.mode == "LSTM":
            return nn.LSTM(self.fin, self.hidden, proj_size=self.proj, **kw)
        if self.mode == "GRU":
            return nn.GRU(self.fin, self.hidden, **kw)
        return nn.RNN(self.fin, self.hidden, nonlinearity=self.mode[4:].lower(), **kw)


@dataclass(frozen=True)
class Attention:
    """Self-attention ``mha(x, k, v)[0]`` with ``k = key(x)`` and ``v = value(x)`` (or ``x`` where
    they are None; a key or value of another width than ``embed`` gives separate projections)."""

    name: str
    embed: int
    heads: int
    batch_first: bool
    bias: bool = True
    add_bias_kv: bool = False
    add_zero_attn: bool = False
    key: Linear | None = None
    value: Linear | None = None

    @property
    def kdim(self) -> int:
        return self.key.fout if self.key else self.embed

    @property
    def vdim(self) -> int:
        return self.value.fout if self.value else self.embed

    def make(self) -> nn.Module:
        return nn.MultiheadAttention(self.embed, self.heads, bias=self.bias, add_bias_kv=self.add_bias_kv,
                                     add_zero_attn=self.add_zero_attn, kdim=self.kdim, vdim=self.vdim,
                                     batch_first=self.batch_first)


def _seq_modules(specs: tuple) -> list:
    """The sequence-specific specs that own modules (SpecNet registers Linear, Act, Residual)."""
    out = []
    for s in specs:
        if isinstance(s, (Embed, Recurrent)):
            out.append(s)
        elif isinstance(s, Attention):
            out += [s] + [p for p in (s.key, s.value) if p is not None]
        elif isinstance(s, Residual):
            out += _seq_modules(s.body + s.shortcut)
    return out


class SeqNet(SpecNet):
    """SpecNet plus embeddings, recurrent layers and self-attention; ``tie`` makes ``decoder``
    share the weight of the ``stem`` embedding."""

    def __init__(self, specs: tuple, batch_first: bool, tie: tuple[str, str] | None = None):
        super().__init__(specs)
        self.batch_first = batch_first
        for s in _seq_modules(specs):
            *path, leaf = s.name.split(".")
            owner = self
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.add_module(leaf, s.make())
        if tie is not None:
            stem, decoder = tie
            self.get_submodule(decoder).weight = self.get_submodule(stem).weight

    def _run(self, s, x):
        if isinstance(s, Embed):
            return self.get_submodule(s.name)(x)
        if isinstance(s, Recurrent):
            flip = s.batch_first != self.batch_first
            y = self.get_submodule(s.name)(x.transpose(0, 1) if flip else x)[0]
            return y.transpose(0, 1) if flip else y
        if isinstance(s, Attention):
            k = x if s.key is None else self.get_submodule(s.key.name)(x)
            v = x if s.value is None else self.get_submodule(s.value.name)(x)
            return self.get_submodule(s.name)(x, k, v, need_weights=False)[0]
        return super()._run(s, x)


@dataclass(frozen=True)
class SeqSpec:
    """A random sequence model: ``stem`` (Embed on token ids, or Linear on float features), blocks,
    a Linear ``head``, and maybe a ``decoder`` Linear tied to the stem embedding's weight (after the
    head, or instead of it where the blocks end with the embedding's width)."""

    stem: Union[Embed, Linear]
    blocks: tuple
    head: Linear | None
    decoder: Linear | None
    n: int
    t: int
    batch_first: bool  # the stream layout: (N, T, C) or (T, N, C)
    seed: int

    @property
    def out_shape(self) -> tuple:
        last = self.decoder or self.head
        return ((self.n, self.t) if self.batch_first else (self.t, self.n)) + (last.fout,)

    def input(self, which: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 7 + 1 + which)
        shape = (self.n, self.t) if self.batch_first else (self.t, self.n)
        if isinstance(self.stem, Embed):
            return torch.randint(0, self.stem.vocab, shape, generator=g)
        return torch.randn(*shape, self.stem.fin, generator=g)

    def build(self) -> tuple[nn.Module, torch.Tensor]:
        """The model (eval mode; every bias and attention parameter drawn non-zero) and its input."""
        specs = (self.stem,) + self.blocks + tuple(s for s in (self.head, self.decoder) if s is not None)
        tie = (self.stem.name, self.decoder.name) if self.decoder else None
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = SeqNet(specs, self.batch_first, tie)
        g = torch.Generator().manual_seed(self.seed + 12345)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "bias" in name or isinstance(model.get_submodule(name.rpartition(".")[0]), nn.MultiheadAttention):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        return model.eval(), self.input(0)


def _attention(b: _Builder, w: int, batch_first: bool, heads: int) -> Attention:
    """Self-attention over ``w`` features with ``heads`` heads; sometimes separate key/value widths."""
    key = value = None
    if b.flag(0.25):
        key = Linear(b.name("key"), w, b.ints(2, 8), b.flag(0.8))
    if b.flag(0.25):
        value = Linear(b.name("value"), w, b.ints(2, 8), b.flag(0.8))
    return Attention(b.name("attn"), w, heads, batch_first, b.flag(0.8), b.flag(0.3), b.flag(0.3), key, value)


def _head_counts(w: int) -> list[int]:
    """Head counts giving a head_dim of 2..4 for ``w`` features."""
    return [w // d for d in (2, 3, 4) if w % d == 0]


def _seq_block(b: _Builder, w: int, batch_first: bool) -> tuple[list, int]:
    kind = b.pick(("recurrent", "attention", "linear", "residual"))
    if kind == "recurrent":
        mode = b.pick(RNN_MODES + ("LSTM",))  # LSTMs twice as often: they alone have projections
        hidden = b.ints(2, 8)
        layers = b.ints(1, 3)
        proj = b.ints(1, hidden - 1) if mode == "LSTM" and b.flag(0.5) else 0
        dropout = 0.25 if layers > 1 and b.flag(0.3) else 0.0
        rnn = Recurrent(b.name(mode.lower()[:4]), mode, w, hidden, layers, b.flag(), b.flag(), b.flag(0.8), proj, dropout)
        return [rnn], rnn.fout
    if kind == "linear":
        fc = Linear(b.name("fc"), w, b.ints(4, 12), b.flag(0.8))
        return [fc] + ([b.act(("relu",), inplace=True)] if b.flag(0.7) else []), fc.fout
    specs = []
    if kind == "attention" or b.flag():  # attention, maybe inside a residual
        if not _head_counts(w) or (kind == "attention" and b.flag(0.3)):  # project to a width with heads
            fc = Linear(b.name("fc"), w, b.ints(4, 12), b.flag(0.8))
            specs.append(fc)
            w = fc.fout
            while not _head_counts(w):
                specs[-1] = fc = Linear(fc.name, fc.fin, fc.fout + 1, fc.bias)
                w = fc.fout
        body = [_attention(b, w, batch_first, b.pick(_head_counts(w)))]
    else:
        body = [Linear(b.name("fc"), w, w, b.flag(0.8))] + ([b.act(("relu",), inplace=True)] if b.flag(0.5) else [])
    if kind == "attention":
        return specs + body, w
    return specs + [Residual(tuple(body), (), b.flag())], w


@st.composite
def sequence_specs(draw, max_blocks: int = 3) -> SeqSpec:
    """A random tiny sequence model (see :class:`SeqSpec`): features 4-12, sequence length 3-5,
    batch 2; recurrent layers of every mode (1-3 layers, bidirectional, batch_first, bias,
    proj_size, dropout), self-attention with 2-4 features per head, Linear(+ReLU) blocks and
    residual adds around attention or Linear blocks."""
    b = _Builder(draw, 2)
    batch_first = b.flag()
    t = b.ints(3, 5)
    b.prefix = "stem." if b.flag(0.3) else ""
    dim = b.ints(4, 12)
    if b.flag(0.7):
        stem = Embed(b.name("emb"), b.ints(5, 12), dim)
    else:
        stem = Linear(b.name("inp"), b.ints(1, 6), dim, b.flag(0.8))
    w, blocks = dim, []
    for i in range(b.ints(1, max_blocks)):
        b.prefix = f"s{i}." if b.flag(0.4) else ""
        specs, w = _seq_block(b, w, batch_first)
        blocks += specs
    b.prefix = "head." if b.flag(0.3) else ""
    decoder = None
    if isinstance(stem, Embed) and b.flag(0.4):
        head = Linear(b.name("fc"), w, dim, b.flag(0.8)) if w != dim or b.flag() else None
        decoder = Linear(b.name("decoder"), dim, stem.vocab, b.flag(0.8))
    else:
        head = Linear(b.name("fc"), w, b.ints(1, 6), b.flag(0.8))
    return SeqSpec(stem, tuple(blocks), head, decoder, 2, t, batch_first, draw(st.integers(0, 2**31 - 1)))
