"""Budget: expected cost from keep probabilities, checked against the cost of compacted models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.methods import Budget


class Block(nn.Module):
    """y = relu(x + bn(conv(relu(bn(conv(x)))))): a removable layer with its own channel group."""

    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden)
        self.conv2, self.bn2 = nn.Conv2d(hidden, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class Residual(nn.Module):
    """Stem, ``blocks`` removable residual blocks on one stream, global pooling, a classifier."""

    def __init__(self, c: int = 8, blocks: int = 2, in_channels: int = 1, classes: int = 10):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(*[Block(c, c) for _ in range(blocks)])
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.blocks(F.relu(self.bn(self.stem(x)))).mean((2, 3)))


class Separable(nn.Module):
    """A residual stack, then a depthwise conv ("channel" units), a grouped 1x1 conv (a unit is a
    whole conv group) and a linear layer reading a flattened map."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(Block(8, 6), Block(8, 4))
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1, groups=2)
        self.fc = nn.Linear(16 * 4, 10)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        x = F.relu(self.pw(F.relu(self.dw(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 2).flatten(1))


class CharLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(20, 12), nn.Linear(16, 20)
        self.lstm = nn.LSTM(12, 16, num_layers=2, batch_first=True)

    def forward(self, tokens):
        return self.out(self.lstm(self.emb(tokens))[0])


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.attn = nn.Embedding(20, 16), nn.MultiheadAttention(16, 4, batch_first=True)
        self.ff1, self.ff2, self.out = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 20)

    def forward(self, tokens):
        x = self.emb(tokens)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.out(x + self.ff2(torch.relu(self.ff1(x))))


CASES = {
    "residual": (lambda: Residual(8, 2), lambda: torch.randn(2, 1, 8, 8)),
    "separable": (Separable, lambda: torch.randn(2, 1, 8, 8)),
    "lstm": (CharLM, lambda: torch.randint(0, 20, (2, 7))),
    "attention": (Attention, lambda: torch.randint(0, 20, (2, 7))),
}


def random_masks(analysis: fxprune.Analysis, generator: torch.Generator, keep: float = 0.6) -> dict:
    """Random group and layer masks; a group that lives in no layer keeps a unit."""
    masks: dict = {}
    for g in analysis.groups:
        if g.prunable:
            mask = torch.rand(g.size, generator=generator) < keep
            if not mask.any() and not any(g.name in layer.groups for layer in analysis.layers):
                mask[0] = True
            masks[g.name] = mask
    for layer in analysis.layers:
        masks[layer.name] = bool(torch.rand((), generator=generator) < keep)
    return masks


def as_probabilities(masks: dict) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, dtype=torch.float) for k, v in masks.items()}


@pytest.mark.parametrize("case", CASES)
def test_dense_cost_is_fxprune_cost(case):
    torch.manual_seed(0)
    model, x = CASES[case][0](), CASES[case][1]()
    budget = Budget(fxprune.analyze(model, x), x)
    assert budget.dense == {"flops": fxprune.cost(model, x).flops, "params": fxprune.cost(model, x).params}
    assert float(budget.expected({})) == budget.dense["flops"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("keep", [0.3, 0.7])
def test_expected_cost_of_0_1_probabilities_is_the_compacted_cost(case, keep):
    torch.manual_seed(0)
    model, x = CASES[case][0](), CASES[case][1]()
    analysis = fxprune.analyze(model, x)
    budget = Budget(analysis, x)
    generator = torch.Generator().manual_seed(len(case))
    for _ in range(3):
        masks = random_masks(analysis, generator, keep)
        small = fxprune.cost(fxprune.compact(model, masks, x, analysis=analysis), x)
        probs = as_probabilities(masks)
        assert float(budget.expected(probs, "flops")) == pytest.approx(small.flops, rel=1e-6)
        assert float(budget.expected(probs, "params")) == pytest.approx(small.params, rel=1e-6)


def test_a_layer_emptied_by_its_group_costs_nothing():
    """compact removes a layer whose inner group loses every unit; the budget agrees, and says so
    smoothly: the layer stays with probability 1 - prod(1 - p) of its group."""
    model, x = Residual(8, 2), torch.randn(2, 1, 8, 8)
    analysis = fxprune.analyze(model, x)
    budget = Budget(analysis, x)
    inner = analysis.layers[0].groups[0]
    removed = fxprune.cost(fxprune.compact(model, {analysis.layers[0].name: False}, x), x).flops
    assert float(budget.expected({inner: torch.zeros(8)})) == removed
    p = torch.full((8,), 0.25)
    q = 1 - 0.75**8
    gated = float(budget.expected({inner: p}))
    # inside the layer conv1 costs p, conv2 costs p, both weighted by q; outside nothing changes
    convs = (budget.dense["flops"] - removed) / 2
    assert gated == pytest.approx(removed + q * 0.25 * 2 * convs, rel=1e-6)


def test_depthwise_cost_is_linear_and_dense_cost_quadratic():
    """A depthwise conv's in and out channels are one unit: its cost goes as p, a conv reading
    and writing pruned channels as p**2."""
    x = torch.randn(2, 3, 6, 6)
    depthwise = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                              nn.Conv2d(8, 5, 1))
    dense = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))
    for model, quadratic in ((depthwise, False), (dense, True)):
        budget = Budget(fxprune.analyze(model, x), x)
        costs = [float(budget.expected({g: torch.full((n,), p) for g, n in budget.groups.items()})) for p in (0, 0.5, 1)]
        linear = costs[1] == pytest.approx((costs[0] + costs[2]) / 2, rel=1e-6)
        assert linear != quadratic


def test_unit_costs_of_a_hidden_layer():
    """A hidden unit of Linear(4, 6) -> Linear(6, 3) costs its row of the first layer and its
    column of the second: 2 * N * (4 + 3) FLOPs and 4 + 1 + 3 parameters."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(5, 4)
    budget = Budget(fxprune.analyze(model, x), x)
    (group,) = budget.groups
    assert torch.equal(budget.unit_costs("flops")[group], torch.full((6,), 2.0 * 5 * (4 + 3)))
    assert torch.equal(budget.unit_costs("params")[group], torch.full((6,), 8.0))
    half = budget.unit_costs("flops", {group: torch.full((6,), 0.5)})[group]
    assert torch.allclose(half, torch.full((6,), 2.0 * 5 * (4 + 3)))  # each layer is linear in p here


def test_layer_cost_and_gradient():
    model, x = Residual(8, 2), torch.randn(2, 1, 8, 8)
    analysis = fxprune.analyze(model, x)
    budget = Budget(analysis, x)
    name = analysis.layers[1].name
    without = fxprune.cost(fxprune.compact(model, {name: False}, x), x)
    assert float(budget.unit_costs("flops")[name]) == pytest.approx(budget.dense["flops"] - without.flops)
    q = torch.tensor(0.3, requires_grad=True)
    budget.fraction({name: q}, "params").backward()
    assert float(q.grad) == pytest.approx((budget.dense["params"] - without.params) / budget.dense["params"])


def test_bad_metric():
    model, x = Residual(8, 1), torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="metric"):
        Budget(fxprune.analyze(model, x), x).expected({}, "latency")


class Gram(nn.Module):
    """A product of two activations (a fixed cost in the budget) whose shape follows a channel group."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(2, 6, 3, padding=1), nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc((h @ h.transpose(1, 2)).mean(1))


@pytest.mark.parametrize("case", [*CASES, "gram"])
def test_a_budget_like_the_one_before_a_resize_is_the_budget_counted_afresh(case):
    torch.manual_seed(0)
    model, x = (Gram, lambda: torch.randn(2, 2, 5)) if case == "gram" else CASES[case]
    model, x = model(), x()
    analysis = fxprune.analyze(model, x)
    before = Budget(analysis, x)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        small = fxprune.compact(model, random_masks(analysis, generator, keep=0.7), x, analysis=analysis)
        after = fxprune.analyze(small, x)
        fresh, like = Budget(after, x), Budget(after, x, like=before)
        assert like.dense == pytest.approx(fresh.dense, rel=1e-9)
        probs = {g: torch.rand(n, generator=generator) for g, n in fresh.groups.items()}
        assert float(like.expected(probs)) == pytest.approx(float(fresh.expected(probs)), rel=1e-9)
    grown, _ = fxprune.grow(small, x, widen={name: 2 for name in fresh.groups if fresh.groups[name] >= 2})
    regrown = fxprune.analyze(grown, x)
    assert Budget(regrown, x, like=like).dense == pytest.approx(Budget(regrown, x).dense, rel=1e-9)


def test_a_budget_like_another_counts_nothing_unless_the_inputs_changed(monkeypatch):
    model, x = Residual(8, 2), torch.randn(2, 1, 8, 8)
    analysis = fxprune.analyze(model, x)
    masks = {g.name: torch.arange(g.size) % 2 == 0 for g in analysis.groups if g.prunable}
    small = fxprune.compact(model, masks, x, analysis=analysis)
    before, after, larger = Budget(analysis, x), fxprune.analyze(small, x), fxprune.analyze(small, x[:, :, :6])

    def counting(*args):
        raise AssertionError("counted FLOPs again")

    monkeypatch.setattr("fxprune.methods.budget.flops_per_node", counting)
    assert Budget(after, x, like=before).dense["flops"] > 0  # the convolutions: scaled, not counted
    with pytest.raises(AssertionError, match="counted"):  # other input shapes: FLOPs change otherwise
        Budget(larger, x[:, :, :6], like=before)
