"""Channel rules of recurrent layers (fxprune/rules/recurrent.py): nn.LSTM, nn.GRU, nn.RNN and their cells.

Covers the gate-block slicing against a hand-computed reference, exactness of ``compact`` against
``apply_masks`` over a grid of configurations, the coupling that the returned and initial states
impose, unrolled cells, training the masked reference, weight tying, PackedSequence inputs, and the
user's model being left untouched. Known library bugs are ``xfail(strict=True)`` with the bug in the
reason.
"""
from __future__ import annotations

import itertools
import warnings
import zlib

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence, pad_packed_sequence

import fxprune
from fxprune.modules.masked import MaskedModule
from fxprune.modules.recurrent import RecurrentStack
from test_rules import _expected_failure, check_exact, fresh_like, outputs  # noqa: F401  (an autouse fixture)

VOCAB, E, H, P, T, N = 11, 4, 5, 2, 3, 2  # vocabulary, embedding, hidden, projection, steps, batch
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
MODES = {  # id -> (class, extra constructor arguments, proj_size)
    "lstm": (nn.LSTM, {}, 0),
    "lstm_proj": (nn.LSTM, {"proj_size": P}, P),
    "gru": (nn.GRU, {}, 0),
    "rnn_tanh": (nn.RNN, {"nonlinearity": "tanh"}, 0),
    "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}, 0),
}
OUTPUT = "reaches the model output"


@pytest.fixture(autouse=True)
def _quiet():
    """nn.LSTM with proj_size warns that oneDNN does not support it; nothing else should warn."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")
        yield


def suffixes(bidirectional: bool) -> list[str]:
    return ["", "_reverse"] if bidirectional else [""]


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter drawn again (biases included, so that they matter), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def mask_with(n: int, kept) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[list(kept)] = True
    return mask


def random_mask(n: int, count: int, g: torch.Generator) -> torch.Tensor:
    return mask_with(n, torch.randperm(n, generator=g)[:count].tolist())


def snapshot(model: nn.Module) -> dict:
    """Everything of ``model`` that fxprune must not change."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "objects": {k: (id(v), v.data_ptr(), v.requires_grad) for k, v in model.state_dict(keep_vars=True).items()},
        "modules": [(name, type(m), m.training) for name, m in model.named_modules()],
        "flat": {name: [id(w) for w in m._flat_weights]
                 for name, m in model.named_modules() if isinstance(m, nn.RNNBase)},
        "attrs": {name: dict(vars(m)) for name, m in model.named_modules()
                  if isinstance(m, (nn.RNNBase, nn.RNNCellBase, nn.Linear, nn.Embedding))},
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["objects"] == before["objects"]
    assert after["modules"] == before["modules"]
    assert after["flat"] == before["flat"]
    for name, attrs in before["attrs"].items():
        now = after["attrs"][name]
        for key, value in attrs.items():
            if key.startswith("_") and key not in ("_flat_weights_names",):
                continue
            assert now[key] == value, (name, key, now[key], value)
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


# --------------------------------------------------------------------------------------------
# attribute consistency of (compacted) recurrent modules


def rnn_widths(m: nn.RNNBase, k: int = 0, s: str = "") -> tuple[int, int, int]:
    """(input, hidden, projected or 0) units of layer ``k``, direction ``s``, read from its parameters."""
    hidden = getattr(m, f"weight_hh_l{k}{s}").shape[0] // GATES[m.mode]
    proj = getattr(m, f"weight_hr_l{k}{s}").shape[0] if m.proj_size else 0
    return getattr(m, f"weight_ih_l{k}{s}").shape[1], hidden, proj


def assert_rnn_consistent(m: nn.RNNBase) -> None:
    """``m``'s attributes agree with its parameter shapes, and its flat weights are its parameters."""
    gates, dirs = GATES[m.mode], suffixes(m.bidirectional)
    out = m.proj_size or m.hidden_size
    for k in range(m.num_layers):
        for s in dirs:
            get = lambda name: tuple(getattr(m, f"{name}_l{k}{s}").shape)  # noqa: E731
            assert get("weight_ih") == (gates * m.hidden_size, m.input_size if k == 0 else len(dirs) * out), (k, s)
            assert get("weight_hh") == (gates * m.hidden_size, out), (k, s)
            if m.bias:
                assert get("bias_ih") == get("bias_hh") == (gates * m.hidden_size,), (k, s)
            if m.proj_size:
                assert get("weight_hr") == (m.proj_size, m.hidden_size), (k, s)
    assert len(m._flat_weights) == len(m._flat_weights_names)
    for w, name in zip(m._flat_weights, m._flat_weights_names):
        assert w is getattr(m, name), name


def assert_rnn_shapes(m: nn.RNNBase, input_size: int, hidden: int, proj: int) -> None:
    """``m`` is consistent and has exactly these widths."""
    assert_rnn_consistent(m)
    assert (m.input_size, m.hidden_size, m.proj_size) == (input_size, hidden, proj), m


def rnn_modules(m: nn.Module) -> list[nn.RNNBase]:
    return [sub for sub in m.modules() if isinstance(sub, nn.RNNBase)]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _rnn_params(gates: int, inp: int, hidden: int, proj: int = 0, bias: bool = True) -> int:
    out = proj or hidden
    return gates * hidden * (inp + out) + 2 * gates * hidden * bias + proj * hidden


def assert_compacted(rnn: nn.Module, old: nn.RNNBase, input_size: int, hidden: dict[str, int],
                     proj: dict[str, int]) -> None:
    """The compact module of ``old`` for kept counts ``hidden``/``proj`` (by suffix "_l<k>[_reverse]").

    Where every layer and direction keeps the same widths (and nn.LSTM can hold them: proj < hidden),
    it is still ``type(old)`` with exactly those widths; else a RecurrentStack of modules of that
    class, each consistent, which holds at least the kept parameters and at most the original's."""
    dirs = suffixes(old.bidirectional)
    names = [f"_l{k}{s}" for k in range(old.num_layers) for s in dirs]
    widths = {(hidden[n], proj.get(n, 0)) for n in names}
    (h, p), = widths if len(widths) == 1 else [(0, 0)]
    if len(widths) == 1 and p < h:
        assert type(rnn) is type(old), type(rnn)
        assert (rnn.num_layers, rnn.bidirectional, rnn.dropout) == (old.num_layers, old.bidirectional, old.dropout)
        assert_rnn_shapes(rnn, input_size, h, p)
    else:
        assert isinstance(rnn, RecurrentStack), type(rnn)
        assert rnn.dropout == old.dropout
    for m in rnn_modules(rnn):
        assert type(m) is type(old)
        assert (m.mode, m.bias, m.batch_first) == (old.mode, old.bias, old.batch_first)
        if m.mode == "RNN_TANH" or m.mode == "RNN_RELU":
            assert m.nonlinearity == old.nonlinearity
        assert_rnn_consistent(m)
    least, inp = 0, input_size
    for k in range(old.num_layers):
        outs = [proj.get(f"_l{k}{s}") or hidden[f"_l{k}{s}"] for s in dirs]
        least += sum(_rnn_params(GATES[old.mode], inp, hidden[f"_l{k}{s}"], proj.get(f"_l{k}{s}", 0), old.bias)
                     for s in dirs)
        inp = sum(outs)
    assert least <= n_params(rnn) <= n_params(old), (least, n_params(rnn), n_params(old))
    if isinstance(rnn, nn.RNNBase):
        assert n_params(rnn) == least


# --------------------------------------------------------------------------------------------
# 1. gate-block slicing against a hand-computed reference


class Plain(nn.Module):
    """x (T, N, E) -> rnn -> out."""

    def __init__(self, cls, bidirectional=False, **kw):
        super().__init__()
        self.rnn = cls(E, H, bidirectional=bidirectional, **kw)
        self.out = nn.Linear(H * (2 if bidirectional else 1), 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.out(y)


KEPT = [0, 2, 3]


@pytest.mark.parametrize("bidirectional, reverse_kept", [(False, None), (True, KEPT), (True, [1, 2, 4])],
                         ids=["uni", "bi-same", "bi-other"])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_gate_blocks_are_sliced_per_unit(cls, bidirectional, reverse_kept):
    """Unit h owns rows g*H + h of every gate block g, column h of weight_hh, and column h (forward)
    or H + h (reverse) of the consumer."""
    gates = {nn.LSTM: 4, nn.GRU: 3}[cls]
    model = randomized(Plain(cls, bidirectional))
    x = torch.randn(T, N, E)
    kept = {"": KEPT, "_reverse": reverse_kept}
    masks = {f"rnn.hidden_l0{s}": mask_with(H, kept[s]) for s in suffixes(bidirectional)}
    small, _ = check_exact(model, x, masks)
    assert type(small.rnn) is cls and small.rnn.hidden_size == 3
    for s in suffixes(bidirectional):
        rows = torch.tensor([g * H + h for g in range(gates) for h in kept[s]])
        cols = torch.tensor(kept[s])
        old, new = (lambda name, m=m: getattr(m, f"{name}_l0{s}") for m in (model.rnn, small.rnn))
        torch.testing.assert_close(new("weight_ih"), old("weight_ih")[rows], rtol=0, atol=0)
        torch.testing.assert_close(new("weight_hh"), old("weight_hh")[rows][:, cols], rtol=0, atol=0)
        torch.testing.assert_close(new("bias_ih"), old("bias_ih")[rows], rtol=0, atol=0)
        torch.testing.assert_close(new("bias_hh"), old("bias_hh")[rows], rtol=0, atol=0)
    columns = KEPT + ([H + h for h in reverse_kept] if bidirectional else [])
    torch.testing.assert_close(small.out.weight, model.out.weight[:, columns], rtol=0, atol=0)
    torch.testing.assert_close(small.out.bias, model.out.bias, rtol=0, atol=0)


def test_masked_units_are_exactly_zero_in_the_reference():
    """apply_masks zeroes the gate rows of a masked unit: its output is exactly zero, every step."""
    model = randomized(Plain(nn.LSTM, bidirectional=True))
    x = torch.randn(T, N, E)
    ref = fxprune.apply_masks(model, {"rnn.hidden_l0": mask_with(H, KEPT)}, x)
    assert isinstance(ref.rnn, MaskedModule)
    seen = {}
    ref.rnn.module.register_forward_hook(lambda m, args, out: seen.update(out=out))
    with torch.no_grad():
        ref(fresh_like(x))
    y, (h_n, c_n) = seen["out"]  # the wrapped LSTM's own output, before the output masks
    dropped = [1, 4]
    assert y[..., dropped].abs().max() == 0 and h_n[0][..., dropped].abs().max() == 0
    assert c_n[0][..., dropped].abs().max() == 0
    assert y[..., KEPT].abs().min() > 0 and y[..., H:].abs().min() > 0  # the others are untouched


# --------------------------------------------------------------------------------------------
# 2. exactness over a grid of configurations


class Net(nn.Module):
    """Embedding -> RNN -> Linear, on (T, N), (N, T) (batch_first) or (T,) (unbatched) indices."""

    def __init__(self, mode: str, num_layers: int, bidirectional: bool, batch_first: bool, bias: bool, dropout: bool):
        super().__init__()
        cls, extra, proj = MODES[mode]
        self.emb = nn.Embedding(VOCAB, E)
        self.rnn = cls(E, H, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias,
                       dropout=0.3 if dropout and num_layers > 1 else 0.0, **extra)
        self.out = nn.Linear((proj or H) * (2 if bidirectional else 1), 3)

    def forward(self, x):
        y, _ = self.rnn(self.emb(x))
        return self.out(y)


FLAGS = ("batch_first", "bias", "dropout", "unbatched", "equal")


def _grid() -> list:
    """Every mode x num_layers x direction, each with settings of FLAGS in which every flag takes
    both values: a random setting, its complement and, for several layers, another random one (seeded)."""
    g = torch.Generator().manual_seed(0)
    params = []
    for mode, layers, bidirectional in itertools.product(MODES, (1, 2, 3), (False, True)):
        row, extra = torch.rand(len(FLAGS), generator=g) < 0.5, torch.rand(len(FLAGS), generator=g) < 0.5
        rows = [row, ~row] + ([extra] if layers > 1 else [])
        for row in rows:
            flags = dict(zip(FLAGS, row.tolist()))
            tag = "-".join([mode, f"L{layers}", "bi" if bidirectional else "uni"]
                           + [name if on else f"no_{name}" for name, on in flags.items()])
            params.append(pytest.param(mode, layers, bidirectional, flags, id=tag))
    return params


@pytest.mark.parametrize("mode, num_layers, bidirectional, flags", _grid())
def test_compact_equals_reference(mode, num_layers, bidirectional, flags):
    _, _, proj_size = MODES[mode]
    model = randomized(Net(mode, num_layers, bidirectional, flags["batch_first"], flags["bias"], flags["dropout"]),
                       seed=zlib.crc32(f"{mode}{num_layers}{bidirectional}{flags}".encode()))
    x_shape = (T,) if flags["unbatched"] else (N, T) if flags["batch_first"] else (T, N)
    x = torch.randint(0, VOCAB, x_shape)
    an = fxprune.analyze(model, x)
    dirs = suffixes(bidirectional)
    names = [f"_l{k}{s}" for k in range(num_layers) for s in dirs]
    expected = {"emb": (E, True), "out": (3, False)}
    expected |= {f"rnn.hidden{n}": (H, True) for n in names}
    expected |= {f"rnn.proj{n}": (P, True) for n in names} if proj_size else {}
    assert {gr.name: (gr.size, gr.prunable) for gr in an.groups} == expected, str(an)
    assert an.group("out").reason == OUTPUT

    # masks: at least one unit per group; with a projection, fewer projected than hidden units
    # (see test_projection_as_wide_as_hidden_*); "equal" keeps the same count in every layer
    g = torch.Generator().manual_seed(zlib.crc32(repr(sorted(flags.items())).encode()) + num_layers)
    low = P + 1 if proj_size else 1
    counts = lambda lo, hi: torch.randint(lo, hi + 1, (), generator=g).item()  # noqa: E731
    same_h, same_p = counts(low, H), counts(1, P)
    hidden = {n: same_h if flags["equal"] else counts(low, H) for n in names}
    proj = {n: same_p if flags["equal"] else counts(1, P) for n in names} if proj_size else {}
    emb_kept = counts(1, E)
    masks = {"emb": random_mask(E, emb_kept, g)}
    masks |= {f"rnn.hidden{n}": random_mask(H, c, g) for n, c in hidden.items()}
    masks |= {f"rnn.proj{n}": random_mask(P, c, g) for n, c in proj.items()}

    small, _ = check_exact(model, x, masks, analysis=an)
    assert_compacted(small.rnn, model.rnn, emb_kept, hidden, proj)
    last = [proj.get(f"_l{num_layers - 1}{s}") or hidden[f"_l{num_layers - 1}{s}"] for s in dirs]
    assert small.out.in_features == sum(last)
    with torch.no_grad():  # other lengths and batch sizes still run, and agree with the reference
        other = torch.randint(0, VOCAB, (T + 2,) if flags["unbatched"] else (N + 1, T + 2))
        ref = fxprune.apply_masks(model, masks, other).eval()  # (see test_reference_runs_on_other_lengths)
        torch.testing.assert_close(small(other), ref(other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("other", [(T + 2, N), (T, N + 1)], ids=["longer", "larger_batch"])
def test_reference_runs_on_other_lengths(other):
    model = randomized(Net("lstm", 1, False, False, True, False))
    x = torch.randint(0, VOCAB, (T, N))
    masks = {"rnn.hidden_l0": mask_with(H, KEPT)}
    ref, small = fxprune.apply_masks(model, masks, x).eval(), fxprune.compact(model, masks, x).eval()
    other_x = torch.randint(0, VOCAB, other)
    with torch.no_grad():
        torch.testing.assert_close(ref(other_x), small(other_x), rtol=1e-5, atol=1e-5)


class CalledTwice(nn.Module):
    """One GRU run on the whole sequence and on its first two steps."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, E)
        self.rnn = nn.GRU(E, H, num_layers=2)
        self.out = nn.Linear(2 * H, 3)

    def forward(self, x):
        e = self.emb(x)
        a, _ = self.rnn(e)
        b, _ = self.rnn(e[:2])
        return self.out(torch.cat([a[-1], b[-1]], -1))


def test_rnn_called_twice_on_different_lengths():
    model = randomized(CalledTwice())
    x = torch.randint(0, VOCAB, (T, N))
    an = fxprune.analyze(model, x)
    assert {g.name for g in an.groups} == {"emb", "rnn.hidden_l0", "rnn.hidden_l1", "out"}
    small, _ = check_exact(model, x, {"rnn.hidden_l1": mask_with(H, KEPT)}, analysis=an)
    assert isinstance(small.rnn, RecurrentStack)


@pytest.mark.parametrize("group", ["rnn.hidden_l0", "rnn.hidden_l1_reverse"])
def test_removing_every_unit_of_a_layer_is_a_mask_error(group):
    model = Net("gru", 2, True, False, True, False)
    for fn in (fxprune.apply_masks, fxprune.compact):
        with pytest.raises(fxprune.MaskError, match=f"'{group}' removes every channel"):
            fn(model, {group: torch.zeros(H, dtype=torch.bool)}, torch.randint(0, VOCAB, (T, N)))


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
def test_parameter_count_one_layer(mode):
    cls, extra, _ = MODES[mode]
    gates = GATES[cls(1, 1, **extra).mode]
    model = randomized(Net(mode, 1, False, False, True, False))
    x = torch.randint(0, VOCAB, (T, N))
    before = sum(p.numel() for p in model.parameters())
    assert before == VOCAB * E + _rnn_params(gates, E, H) + 3 * H + 3
    small = fxprune.compact(model, {"rnn.hidden_l0": mask_with(H, [1, 3]), "emb": mask_with(E, [0, 1, 3])}, x)
    after = sum(p.numel() for p in small.parameters())
    assert after == VOCAB * 3 + _rnn_params(gates, 3, 2) + 3 * 2 + 3
    assert after == before - (VOCAB + gates * (E * H - 3 * 2) + gates * (H * H - 2 * 2) + 2 * gates * 3 + 3 * 3)


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_relu"])
def test_parameter_count_layers_of_different_widths(mode):
    cls, extra, _ = MODES[mode]
    gates = GATES[cls(1, 1, **extra).mode]
    model = randomized(Net(mode, 2, False, True, True, False))
    x = torch.randint(0, VOCAB, (N, T))
    masks = {"rnn.hidden_l0": mask_with(H, [0, 4]), "rnn.hidden_l1": mask_with(H, [1, 2, 3])}
    small, _ = check_exact(model, x, masks)
    assert isinstance(small.rnn, RecurrentStack)
    after = sum(p.numel() for p in small.parameters())
    assert after == VOCAB * E + _rnn_params(gates, E, 2) + _rnn_params(gates, 2, 3) + 3 * 3 + 3


def test_parameter_count_lstm_projection():
    model = randomized(Net("lstm_proj", 1, False, False, True, False))
    x = torch.randint(0, VOCAB, (T, N))
    assert sum(p.numel() for p in model.parameters()) == VOCAB * E + _rnn_params(4, E, H, P) + 3 * P + 3
    small, _ = check_exact(model, x, {"rnn.hidden_l0": mask_with(H, [0, 1, 4]), "rnn.proj_l0": mask_with(P, [1])})
    assert type(small.rnn) is nn.LSTM
    assert_rnn_shapes(small.rnn, E, 3, 1)
    assert sum(p.numel() for p in small.parameters()) == VOCAB * E + _rnn_params(4, E, 3, 1) + 3 * 1 + 3


# LSTM projections as wide as (or wider than) the kept hidden units: nn.LSTM cannot hold them
# (its constructor wants proj_size < hidden_size, and its kernel tells projections apart by
# h0.size(-1) != c0.size(-1)), yet compaction must stay exact


class Proj(nn.Module):
    def __init__(self, num_layers):
        super().__init__()
        self.rnn = nn.LSTM(E, H, num_layers=num_layers, proj_size=3)
        self.out = nn.Linear(3, 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.out(y)


@pytest.mark.parametrize("num_layers, kept", [(1, [0, 3]), (1, [0, 2, 3]), (2, [0, 3]), (2, [0, 2, 3])],
                         ids=["1-wider", "1-as_wide", "2-wider", "2-as_wide"])
def test_projection_as_wide_as_hidden(num_layers, kept):
    model = randomized(Proj(num_layers))
    small, _ = check_exact(model, torch.randn(T, N, E), {"rnn.hidden_l0": mask_with(H, kept)})
    hidden = {f"_l{k}": len(kept) if k == 0 else H for k in range(num_layers)}
    assert_compacted(small.rnn, model.rnn, E, hidden, {f"_l{k}": 3 for k in range(num_layers)})


@pytest.mark.parametrize("mode", ["lstm", "gru", "lstm_proj"])
def test_compacting_a_compacted_rnn_again(mode):
    """A RecurrentStack (layers and directions of different widths) has the groups of the RNN it
    came from, so the compact model can be pruned again, exactly."""
    model = randomized(Net(mode, 2, True, True, True, True))
    x = torch.randint(0, VOCAB, (N, T))
    masks = {"rnn.hidden_l0": mask_with(H, [0, 1, 2, 4]), "rnn.hidden_l0_reverse": mask_with(H, [0, 3, 4]),
             "rnn.hidden_l1": mask_with(H, [1, 2, 3])}
    small, _ = check_exact(model, x, masks)
    assert isinstance(small.rnn, RecurrentStack)
    an = fxprune.analyze(small, x)
    sizes = {"rnn.hidden_l0": 4, "rnn.hidden_l0_reverse": 3, "rnn.hidden_l1": 3, "rnn.hidden_l1_reverse": H}
    expected = {"emb": (E, True), "out": (3, False)} | {k: (v, True) for k, v in sizes.items()}
    expected |= {k.replace("hidden", "proj"): (P, True) for k in sizes} if mode == "lstm_proj" else {}
    assert {g.name: (g.size, g.prunable) for g in an.groups} == expected, str(an)
    again = {"rnn.hidden_l0": mask_with(4, [0, 3]), "rnn.hidden_l1_reverse": mask_with(H, [0, 3, 4]),
             "emb": mask_with(E, [1, 2, 3])}
    smaller, _ = check_exact(small, x, again, analysis=an)
    for m in rnn_modules(smaller.rnn):
        assert_rnn_consistent(m)
    assert n_params(smaller) < n_params(small)


# --------------------------------------------------------------------------------------------
# 3. states: returned h_n/c_n and initial states couple the layers


class UsesStates(nn.Module):
    """The read-out reads the last layer's final state(s)."""

    def __init__(self, cls=nn.LSTM, num_layers=2, bidirectional=False, **kw):
        super().__init__()
        self.lstm = cls is nn.LSTM
        self.emb = nn.Embedding(VOCAB, E)
        self.rnn = cls(E, H, num_layers=num_layers, bidirectional=bidirectional, **kw)
        width = kw.get("proj_size") or H
        self.out = nn.Linear(width, 3)
        self.out_c = nn.Linear(H, 3)

    def forward(self, x):
        if self.lstm:
            _, (h, c) = self.rnn(self.emb(x))
            return self.out(h[-1]) + self.out_c(c[-1])
        _, h = self.rnn(self.emb(x))
        return self.out(h[-1])


STATE_CASES = {
    "lstm": (nn.LSTM, 2, False, {}),
    "lstm-3-bi": (nn.LSTM, 3, True, {}),
    "lstm-proj-bi": (nn.LSTM, 2, True, {"proj_size": P}),
    "gru-bi": (nn.GRU, 2, True, {}),
    "rnn": (nn.RNN, 3, False, {}),
}


@pytest.mark.parametrize("cls, num_layers, bidirectional, kw", list(STATE_CASES.values()), ids=list(STATE_CASES))
def test_used_states_couple_every_layer(cls, num_layers, bidirectional, kw):
    model = randomized(UsesStates(cls, num_layers, bidirectional, **kw))
    x = torch.randint(0, VOCAB, (T, N))
    an = fxprune.analyze(model, x)
    proj = kw.get("proj_size", 0)
    expected = {"emb": (E, True), "rnn.hidden_l0": (H, True), "out": (3, False)}
    expected |= {"rnn.proj_l0": (P, True)} if proj else {}
    assert {g.name: (g.size, g.prunable) for g in an.groups} == expected, str(an)
    hidden = an.group("rnn.hidden_l0")
    rows = {(m.name, m.dim) for m in hidden.members if m.kind == "param"}
    for k, s in itertools.product(range(num_layers), suffixes(bidirectional)):
        assert (f"rnn.weight_hh_l{k}{s}", 0) in rows, (k, s, rows)
    masks = {"rnn.hidden_l0": mask_with(H, [0, 2, 4])} | ({"rnn.proj_l0": mask_with(P, [1])} if proj else {})
    small, _ = check_exact(model, x, masks, analysis=an)
    assert type(small.rnn) is cls
    assert_rnn_shapes(small.rnn, E, 3, 1 if proj else 0)
    assert small.out.in_features == (1 if proj else 3)
    if cls is nn.LSTM:
        torch.testing.assert_close(small.out_c.weight, model.out_c.weight[:, [0, 2, 4]], rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: UsesStates(nn.LSTM, 2, False, proj_size=P),
                                  lambda: InitialState(nn.LSTM, proj=P)], ids=["c_n_used", "initial_state"])
def test_coupled_projection_as_wide_as_hidden(make):
    """nn.LSTM needs more hidden units than projected ones; with its cell state used or passed in,
    compaction cannot add zero units to make up the difference: a clear error."""
    model = randomized(make())
    x = torch.randint(0, VOCAB, (T, N))
    an = fxprune.analyze(model, x)
    hidden = next(g for g in an.groups if "rnn.hidden_l0" in g.producers)
    with pytest.raises(fxprune.CompactError, match="needs more hidden units than projected ones"):
        fxprune.compact(model, {hidden.name: mask_with(H, [0, 3])}, x, analysis=an)
    check_exact(model, x, {hidden.name: mask_with(H, [0, 1, 3])}, analysis=an)


def test_unused_states_leave_layers_independent():
    """The same model reading only the output: one group per layer and direction."""
    an = fxprune.analyze(Net("lstm", 2, True, False, True, False), torch.randint(0, VOCAB, (T, N)))
    assert {g.name for g in an.groups if g.name.startswith("rnn.")} == {
        "rnn.hidden_l0", "rnn.hidden_l0_reverse", "rnn.hidden_l1", "rnn.hidden_l1_reverse"}


class InitialState(nn.Module):
    """h0 (and c0) computed by Linear layers from the first step's embedding."""

    def __init__(self, cls=nn.LSTM, num_layers=2, bidirectional=False, batch_first=False, proj=0, by_reshape=True):
        super().__init__()
        self.stacked = num_layers * (2 if bidirectional else 1)
        self.lstm, self.batch_first, self.by_reshape = cls is nn.LSTM, batch_first, by_reshape
        self.width = proj or H
        kw = {"proj_size": proj} if proj else {}
        self.emb = nn.Embedding(VOCAB, E)
        self.init_h = nn.Linear(E, self.stacked * self.width if by_reshape else self.width)
        self.init_c = nn.Linear(E, H)
        self.rnn = cls(E, H, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, **kw)
        self.out = nn.Linear(self.width * (2 if bidirectional else 1), 3)

    def forward(self, x):
        e = self.emb(x)
        first = e[:, 0] if self.batch_first else e[0]
        if self.by_reshape:  # one Linear output per (layer, direction, unit)
            h0 = self.init_h(first).reshape(-1, self.stacked, self.width).transpose(0, 1).contiguous()
        else:  # the same units for every layer
            h0 = self.init_h(first).unsqueeze(0).expand(self.stacked, -1, -1).contiguous()
        if self.lstm:
            c0 = torch.tanh(self.init_c(first)).unsqueeze(0).expand(self.stacked, -1, -1).contiguous()
            y, _ = self.rnn(e, (h0, c0))
        else:
            y, _ = self.rnn(e, h0)
        return self.out(y)


INIT_CASES = {
    "lstm-reshape": dict(cls=nn.LSTM),
    "lstm-expand-bi": dict(cls=nn.LSTM, bidirectional=True, by_reshape=False),
    "gru-reshape-bi": dict(cls=nn.GRU, bidirectional=True),
    "rnn-expand-batch_first": dict(cls=nn.RNN, num_layers=3, batch_first=True, by_reshape=False),
    "lstm-proj-bi": dict(cls=nn.LSTM, bidirectional=True, proj=P),
}


@pytest.mark.parametrize("kw", list(INIT_CASES.values()), ids=list(INIT_CASES))
def test_initial_state_from_a_linear(kw):
    model = randomized(InitialState(**kw))
    x = torch.randint(0, VOCAB, (N, T) if kw.get("batch_first") else (T, N))
    an = fxprune.analyze(model, x)
    proj = kw.get("proj", 0)
    hidden = next(g for g in an.groups if "rnn.hidden_l0" in g.producers)
    assert hidden.prunable and hidden.size == H, str(an)
    assert not any(g.name.startswith("rnn.hidden_l1") or g.name.startswith("rnn.proj_l1") for g in an.groups), str(an)
    masks = {hidden.name: mask_with(H, [1, 2, 4])}
    if proj:
        projected = next(g for g in an.groups if "rnn.proj_l0" in g.producers)
        assert "init_h" in projected.producers and projected.size == P
        masks[projected.name] = mask_with(P, [0])
    else:
        assert "init_h" in hidden.producers
    if kw["cls"] is nn.LSTM:
        assert "init_c" in hidden.producers
    small, _ = check_exact(model, x, masks, analysis=an)
    assert type(small.rnn) is kw["cls"]
    assert_rnn_shapes(small.rnn, E, 3, 1 if proj else 0)
    assert small.init_h.out_features == model.init_h.out_features // (P if proj else H) * (1 if proj else 3)


class ZeroState(nn.Module):
    """A zero initial state, sized from the input (``torch.zeros(L, x.size(1), H)``) or by literals
    only (FX then stores it as a constant tensor)."""

    def __init__(self, literal: bool):
        super().__init__()
        self.literal = literal
        self.emb = nn.Embedding(VOCAB, E)
        self.rnn = nn.LSTM(E, H, num_layers=2)
        self.out = nn.Linear(H, 3)

    def forward(self, x):
        h0 = torch.zeros(2, N, H) if self.literal else torch.zeros(2, x.size(1), H)
        y, _ = self.rnn(self.emb(x), (h0, h0))
        return self.out(y)


@pytest.mark.parametrize("literal", [False, True], ids=["sized_from_input", "literal"])
def test_zero_initial_state_is_exact_or_explained(literal):
    """A zero initial state couples the layers; the units are prunable and compaction is exact, or
    they are not prunable, with a reason, and a mask removing them is a MaskError."""
    model = randomized(ZeroState(literal))
    x = torch.randint(0, VOCAB, (T, N))
    an = fxprune.analyze(model, x)
    g = next(g for g in an.groups if "rnn.hidden_l0" in g.producers)
    assert not any(gr.name.startswith("rnn.hidden_l1") for gr in an.groups)
    assert an.group("emb").prunable, str(an)
    if g.prunable:
        small, _ = check_exact(model, x, {g.name: mask_with(H, KEPT)}, analysis=an)
        assert type(small.rnn) is nn.LSTM and small.rnn.hidden_size == len(KEPT)
    else:
        assert g.reason, g
        with pytest.raises(fxprune.MaskError, match="not prunable"):
            fxprune.compact(model, {g.name: mask_with(H, KEPT)}, x)


class StateFromInput(nn.Module):
    def __init__(self, cls=nn.GRU):
        super().__init__()
        self.rnn = cls(E, H)
        self.out = nn.Linear(H, 3)

    def forward(self, x, h0):
        y, _ = self.rnn(x, h0)
        return self.out(y)


class CellStateFromInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(E, H)
        self.out = nn.Linear(H, 3)

    def forward(self, x, h0):
        return self.out(self.cell(x, h0))


@pytest.mark.parametrize("make, inputs, group", [
    (StateFromInput, lambda: (torch.randn(T, N, E), torch.randn(1, N, H)), "rnn.hidden_l0"),
    (CellStateFromInput, lambda: (torch.randn(N, E), torch.randn(N, H)), "cell.hidden"),
], ids=["gru", "gru_cell"])
def test_initial_state_from_the_model_input_is_not_prunable(make, inputs, group):
    model = randomized(make())
    xs = inputs()
    an = fxprune.analyze(model, xs)
    g = an.group(group)
    assert not g.prunable and g.reason and "model input" in g.reason, g
    before = snapshot(model)
    for fn in (fxprune.apply_masks, fxprune.compact):
        with pytest.raises(fxprune.MaskError) as err:
            fn(model, {group: mask_with(H, [0, 1])}, xs)
        assert f"'{group}'" in str(err.value) and "not prunable" in str(err.value) and "model input" in str(err.value)
    assert_untouched(model, before)


# --------------------------------------------------------------------------------------------
# 4. cells unrolled over a fixed number of steps


class Unrolled(nn.Module):
    """A cell run for ``T`` steps (a Python loop over a constant), its state initialised by a Linear;
    the read-out sees every step."""

    def __init__(self, cls, init=True):
        super().__init__()
        self.lstm, self.init = cls is nn.LSTMCell, init
        self.emb = nn.Embedding(VOCAB, E)
        self.init_h = nn.Linear(E, H)
        self.init_c = nn.Linear(E, H)
        self.cell = cls(E, H)
        self.out = nn.Linear(H, 3)

    def forward(self, x):  # x: (T, N) indices
        e = self.emb(x)
        h, c = (self.init_h(e[0]), self.init_c(e[0])) if self.init else (None, None)
        ys = []
        for t in range(T):
            if self.lstm:
                h, c = self.cell(e[t], None if h is None else (h, c))
            else:
                h = self.cell(e[t], h)
            ys.append(self.out(h))
        return torch.stack(ys)


@pytest.mark.parametrize("init", [True, False], ids=["linear_init", "zero_init"])
@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell, nn.RNNCell], ids=["lstm", "gru", "rnn"])
def test_unrolled_cell(cls, init):
    model = randomized(Unrolled(cls, init))
    x = torch.randint(0, VOCAB, (T, N))
    an = fxprune.analyze(model, x)
    calls = [n for n in an.gm.graph.nodes if n.op == "call_module" and n.target == "cell"]
    assert len(calls) == T
    # one group for the cell's units, shared by every call (and the Linears that initialise them)
    cell_groups = [g for g in an.groups if "cell.hidden" in g.producers]
    assert len(cell_groups) == 1, str(an)
    g = cell_groups[0]
    assert g.size == H and g.prunable
    expected = {"cell.hidden"} | ({"init_h"} | ({"init_c"} if cls is nn.LSTMCell else set()) if init else set())
    assert set(g.producers) == expected, g.producers
    table = {gr.name: (gr.size, gr.prunable) for gr in an.groups}
    assert table == {"emb": (E, True), g.name: (H, True), "out": (3, False)} | (
        {"init_c": (H, True)} if init and cls is not nn.LSTMCell else {}), str(an)
    small, _ = check_exact(model, x, {g.name: mask_with(H, [0, 3, 4]), "emb": mask_with(E, [1, 2])}, analysis=an)
    gates = {nn.LSTMCell: 4, nn.GRUCell: 3, nn.RNNCell: 1}[cls]
    rows = torch.tensor([k * H + h for k in range(gates) for h in [0, 3, 4]])
    assert (small.cell.input_size, small.cell.hidden_size) == (2, 3)
    torch.testing.assert_close(small.cell.weight_hh, model.cell.weight_hh[rows][:, [0, 3, 4]], rtol=0, atol=0)
    torch.testing.assert_close(small.cell.weight_ih, model.cell.weight_ih[rows][:, [1, 2]], rtol=0, atol=0)
    torch.testing.assert_close(small.out.weight, model.out.weight[:, [0, 3, 4]], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# 5. training the masked reference


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_training_the_reference_keeps_masked_units_zero(cls):
    torch.manual_seed(0)
    model = randomized(Net({nn.LSTM: "lstm", nn.GRU: "gru"}[cls], 2, True, False, True, True))
    assert model.rnn.dropout > 0
    x = torch.randint(0, VOCAB, (T, N))
    kept = {"_l0": [0, 1], "_l0_reverse": [2, 3, 4], "_l1": [4], "_l1_reverse": [0, 2]}
    masks = {f"rnn.hidden{s}": mask_with(H, v) for s, v in kept.items()}
    before = snapshot(model)
    ref = fxprune.apply_masks(model, masks, x).train()
    inner = ref.rnn.module
    initial = {k: v.detach().clone() for k, v in inner.named_parameters()}
    seen = {}
    inner.register_forward_hook(lambda m, args, out: seen.update(out=out))
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for _ in range(3):
        loss = ref(fresh_like(x)).pow(2).mean() - ref(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        y, state = seen["out"]  # the last call, in training mode (dropout between layers active)
        h_n = state[0] if cls is nn.LSTM else state
        for i, (s, units) in enumerate(kept.items()):
            dropped = [u for u in range(H) if u not in units]
            assert h_n[i][..., dropped].abs().max() == 0, s
            if cls is nn.LSTM:
                assert state[1][i][..., dropped].abs().max() == 0, s
        for d, s in enumerate(["_l1", "_l1_reverse"]):
            dropped = [d * H + u for u in range(H) if u not in kept[s]]
            assert y[..., dropped].abs().max() == 0
            assert y[..., [d * H + u for u in kept[s]]].abs().min() > 0
    gates = GATES[inner.mode]
    changed = False
    for name, p in inner.named_parameters():  # masked rows get no gradient: unchanged by SGD
        s = name[name.index("_l"):]
        dropped_rows = [g * H + u for g in range(gates) for u in range(H) if u not in kept[s]]
        torch.testing.assert_close(p.detach()[dropped_rows], initial[name][dropped_rows], rtol=0, atol=0)
        changed |= not torch.equal(p.detach(), initial[name])
    assert changed
    assert_untouched(model, before)


# --------------------------------------------------------------------------------------------
# 6. weight tying


class TiedLM(nn.Module):
    """A language model whose decoder shares the embedding's weight (``decoder.weight = emb.weight``)."""

    def __init__(self, num_layers=2, bottleneck=False):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 6)
        self.rnn = nn.LSTM(6, H if bottleneck else 6, num_layers=num_layers)
        self.proj = nn.Linear(H, 6) if bottleneck else nn.Identity()
        self.decoder = nn.Linear(6, VOCAB)
        self.decoder.weight = self.emb.weight

    def forward(self, x):
        y, _ = self.rnn(self.emb(x))
        return self.decoder(self.proj(y))


@pytest.mark.parametrize("num_layers, bottleneck", [(1, False), (2, False), (2, True)],
                         ids=["1-layer", "2-layers", "bottleneck"])
def test_tied_embedding_and_decoder(num_layers, bottleneck):
    model = randomized(TiedLM(num_layers, bottleneck))
    assert model.decoder.weight is model.emb.weight
    before = snapshot(model)
    x = torch.randint(0, VOCAB, (T, N))
    an = fxprune.analyze(model, x)
    # the decoder's input columns are the embedding's columns: whatever feeds the decoder is coupled
    # with the embedding dimension
    feeds_decoder = "proj" if bottleneck else f"rnn.hidden_l{num_layers - 1}"
    g = an.group("emb")
    assert feeds_decoder in g.producers and g.size == 6 and g.prunable, str(an)
    members = {(m.name, m.dim) for m in g.members if m.kind == "param"}
    assert ("emb.weight", 1) in members
    assert (("proj.weight", 0) if bottleneck else (f"rnn.weight_hh_l{num_layers - 1}", 0)) in members, members
    assert an.group("decoder").reason == OUTPUT
    masks = {"emb": mask_with(6, [0, 2, 5])}
    masks |= {gr.name: mask_with(gr.size, [1, 3]) for gr in an.groups if gr.name.startswith("rnn.")}
    small, _ = check_exact(model, x, masks, analysis=an)
    assert small.decoder.weight is small.emb.weight
    assert small.decoder.weight.data_ptr() == small.emb.weight.data_ptr()
    torch.testing.assert_close(small.emb.weight, model.emb.weight[:, [0, 2, 5]], rtol=0, atol=0)
    assert (small.emb.embedding_dim, small.decoder.in_features) == (3, 3)
    names = [n for n, _ in small.named_parameters()]
    assert "decoder.weight" not in names and "emb.weight" in names  # one shared tensor, counted once
    assert_untouched(model, before)
    assert model.decoder.weight is model.emb.weight


# --------------------------------------------------------------------------------------------
# 7. PackedSequence


class VariableLength(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(E, H)
        self.out = nn.Linear(H, 3)

    def forward(self, x):
        packed = pack_padded_sequence(x, [T, T - 1])
        y, _ = self.rnn(packed)
        y, _ = pad_packed_sequence(y)
        return self.out(y)


class TakesPacked(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(E, H)
        self.out = nn.Linear(H, 3)

    def forward(self, packed):
        y, _ = self.rnn(packed)
        return self.out(y.data)


ENTRY_POINTS = {
    "analyze": lambda model, x: fxprune.analyze(model, x),
    "apply_masks": lambda model, x: fxprune.apply_masks(model, {"rnn.hidden_l0": mask_with(H, KEPT)}, x),
    "compact": lambda model, x: fxprune.compact(model, {"rnn.hidden_l0": mask_with(H, KEPT)}, x),
}


def _packed() -> nn.utils.rnn.PackedSequence:
    return pack_sequence([torch.randn(T, E), torch.randn(T - 1, E)])


@pytest.mark.parametrize("fn", list(ENTRY_POINTS.values()), ids=list(ENTRY_POINTS))
def test_pack_padded_sequence_inside_forward_is_rejected_clearly(fn):
    model = randomized(VariableLength())
    before = snapshot(model)
    with pytest.raises(fxprune.TraceError, match="calls pack_padded_sequence. PackedSequence inputs are not supported"):
        fn(model, torch.randn(T, N, E))
    assert_untouched(model, before)


@pytest.mark.parametrize("fn", list(ENTRY_POINTS.values()), ids=list(ENTRY_POINTS))
def test_packed_sequence_input_is_rejected_clearly(fn):
    model = randomized(TakesPacked())
    before = snapshot(model)
    with pytest.raises(fxprune.TraceError, match="an example input is a PackedSequence"):
        fn(model, _packed())
    assert_untouched(model, before)


# --------------------------------------------------------------------------------------------
# 8. the user's model is never changed


UNTOUCHED = {
    "net-bi-3": (lambda: Net("lstm", 3, True, True, True, True), lambda: torch.randint(0, VOCAB, (N, T))),
    "net-proj": (lambda: Net("lstm_proj", 2, True, False, False, False), lambda: torch.randint(0, VOCAB, (T, N))),
    "gru-unbatched": (lambda: Net("gru", 2, False, False, True, False), lambda: torch.randint(0, VOCAB, (T,))),
    "states": (lambda: UsesStates(nn.LSTM, 2, True), lambda: torch.randint(0, VOCAB, (T, N))),
    "initial-state": (lambda: InitialState(nn.GRU, bidirectional=True), lambda: torch.randint(0, VOCAB, (T, N))),
    "cell": (lambda: Unrolled(nn.LSTMCell), lambda: torch.randint(0, VOCAB, (T, N))),
    "tied": (lambda: TiedLM(2), lambda: torch.randint(0, VOCAB, (T, N))),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("make, inputs", list(UNTOUCHED.values()), ids=list(UNTOUCHED))
def test_user_model_is_untouched(make, inputs, training):
    model = randomized(make()).train(training)
    x = inputs()
    before = snapshot(model)
    with torch.no_grad():
        expected = outputs(model.eval()(x))
    model.train(training)
    an = fxprune.analyze(model, x)
    g = torch.Generator().manual_seed(3)
    masks = {gr.name: random_mask(gr.size, max(1, gr.size // 2), g) for gr in an.groups if gr.prunable}
    assert len(masks) >= 2
    ref = fxprune.apply_masks(model, masks, x, analysis=an)
    small = fxprune.compact(model, masks, x, analysis=an)
    ref(x), small(x)  # running the results (in the model's mode) does not reach back either
    assert_untouched(model, before)
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert not ptrs & {p.data_ptr() for p in itertools.chain(ref.parameters(), small.parameters())}
    with torch.no_grad():
        for got, want in zip(outputs(model.eval()(x)), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


class _ResidualOverLSTM(nn.Module):
    """y + fc(y) after a two-layer bidirectional LSTM: the last layer's units join fc's outputs."""

    def __init__(self):
        super().__init__()
        self.rnn, self.fc, self.head = nn.LSTM(4, 3, num_layers=2, bidirectional=True), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y + self.fc(y))


def test_unit_zeroed_inside_a_compacted_lstm_whose_unread_states_keep_other_indices():
    """Regression: the layers keep the same number of units but not the same ones, so the unread
    h_n has no dense form; zeroing a kept unit inside the compacted nn.LSTM built its h_n mask from
    that form and failed to broadcast."""
    torch.manual_seed(0)
    model, x = _ResidualOverLSTM().eval(), torch.randn(5, 2, 4)
    masks = {"rnn.hidden_l0": mask_with(3, [0, 1]), "rnn.hidden_l0_reverse": mask_with(3, [1, 2]),
             "fc": torch.tensor([1, 1, 0, 0, 1, 1], dtype=torch.bool), "rnn.hidden_l1": mask_with(3, [0])}
    small, _ = check_exact(model, x, masks)
    assert small.get_submodule("rnn").module.hidden_size == 2
