"""GrowEfficient: sampled gates, beta annealing, the budget-aware penalty, compaction and resizing."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.methods import GrowEfficient
from fxprune.methods.sampled_gate import SampledGate

from test_budget import Residual
from test_derived_analysis import assert_same_analysis

X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.arange(4)


def make(**kwargs) -> GrowEfficient:
    """GrowEfficient on groups of 8 channels, unrounded unless asked (rounded to 8, each stays whole)."""
    torch.manual_seed(0)
    return GrowEfficient(Residual(8, 2), X, **{"epochs": 5, "round_to": 1, **kwargs})


def step(ge: GrowEfficient, optimizer: torch.optim.Optimizer) -> None:
    loss = F.cross_entropy(ge.model(X), Y) + ge.penalty()
    optimizer.zero_grad()
    ge.gate_optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    ge.gate_optimizer.step()


def randomize(ge: GrowEfficient, generator: torch.Generator) -> None:
    """Random logits (each group keeps a unit on) and BatchNorm statistics."""
    with torch.no_grad():
        for g in ge.gates().values():
            g.weight.copy_(torch.randn(g.weight.shape, generator=generator))
            g.weight[0] = abs(g.weight[0]) + 0.1
        for m in ge.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)


def test_straight_through_gradient():
    """The value is a 0/1 sample; the gradient is d sigma(beta * s) / ds times the upstream one."""
    s = torch.tensor([-2.0, -0.3, 0.0, 0.4, 3.0])
    gate = SampledGate("g", s, beta=2.5).train()
    upstream = torch.tensor([0.5, -1.0, 2.0, 3.0, -0.25])
    values = gate.values()
    assert set(values.tolist()) <= {0.0, 1.0}
    (values * upstream).sum().backward()
    p = torch.sigmoid(2.5 * s)
    assert torch.allclose(gate.weight.grad, 2.5 * p * (1 - p) * upstream)


def test_sampling_statistics_and_one_sample_per_pass():
    s = torch.tensor([-1.5, -0.2, 0.0, 0.7, 2.0])
    gate = SampledGate("g", s, beta=1.0).train()
    torch.manual_seed(0)
    draws = []
    for _ in range(4000):
        gate.begin_pass()
        first = gate.values().detach()
        assert torch.equal(first, gate.values().detach())  # every call of one pass: the same sample
        draws.append(first)
    mean = torch.stack(draws).mean(0)
    p = torch.sigmoid(s)
    assert torch.all((mean - p).abs() < 4 * torch.sqrt(p * (1 - p) / 4000))
    assert torch.equal(gate.eval().values(), (s > 0).float())


def test_a_residual_stream_shares_its_sample_between_producers():
    ge = make(seed=0.5)
    gate = ge.gates()[ge.analysis.groups[0].name]  # the stream: stem and both blocks produce it
    assert len(ge.analysis.groups[0].producers) == 3
    seen = []
    values = gate.values
    gate.values = lambda: seen.append(values().detach()) or seen[-1]
    ge.model.train()(X)
    assert len(seen) == 3 and all(torch.equal(v, seen[0]) for v in seen)


def test_beta_goes_from_1_to_beta_final_over_the_epochs():
    ge = make(epochs=6, beta_final=200.0)
    assert ge.beta == 1.0 and all(g.beta == 1.0 for g in ge.gates().values())
    betas = []
    for _ in range(5):
        ge.after_epoch()
        betas.append(ge.beta)
    assert betas[-1] == pytest.approx(200.0)
    assert betas == pytest.approx([200.0 ** (e / 5) for e in range(1, 6)])
    assert all(g.beta == ge.beta for g in ge.gates().values())
    ge.after_epoch()
    assert ge.beta == pytest.approx(200.0)  # capped


@pytest.mark.parametrize("seed, target, sign", [(1.0, 0.2, 1), (0.25, 0.9, -1)])
def test_penalty_prunes_above_the_budget_and_grows_below(seed, target, sign):
    ge = make(seed=seed, target=target)
    ge.penalty().backward()
    assert math.copysign(1, ge.lam) == sign and abs(ge.lam) == ge.lam0  # far from the target: full strength
    for g in ge.gates().values():
        assert torch.all(torch.sign(g.weight.grad) == sign), g.key  # SGD moves s against the gradient


def test_penalty_is_proportional_within_tol():
    ge = make(seed=1.0, tol=0.1)
    ge.target = 1.0 - 0.05
    ge.penalty()
    assert ge.lam == pytest.approx(ge.lam0 * 0.5)


def test_seed_architecture_and_masks():
    ge = make(seed=0.25)
    masks = ge.masks()
    for g in ge.analysis.groups:
        if g.prunable:
            assert int(masks[g.name].sum()) == math.ceil(0.25 * g.size)
    assert all(masks[layer.name] is True for layer in ge.analysis.layers)
    layers = GrowEfficient(Residual(8, 4), X, epochs=2, seed_layers=0.5, round_to=1).masks()
    assert [layers[f"blocks.{i}"] for i in range(4)] == [True, False, False, True]


def test_cost_is_the_compacted_cost_and_compaction_is_exact():
    ge = make()
    randomize(ge, torch.Generator().manual_seed(3))
    small, mapping = ge.compact(round_to=1)  # the architecture itself: cost() counts no rounding
    assert ge.cost() == fxprune.cost(small, X)
    assert ge.fraction() == pytest.approx(fxprune.cost(small, X).flops / fxprune.cost(Residual(8, 2), X).flops)
    with torch.no_grad():
        assert torch.allclose(ge.model.eval()(X), small.eval()(X), atol=1e-5)
    assert set(mapping) >= {n for n, _ in small.named_parameters()}


def test_training_then_compaction_is_exact():
    ge = make(seed=0.5, target=0.3)
    optimizer = torch.optim.SGD(ge.weights(), lr=0.05, momentum=0.9)
    for _ in range(5):
        step(ge, optimizer)
    small, _ = ge.compact()
    with torch.no_grad():
        assert torch.allclose(ge.model.eval()(X), small.eval()(X), atol=1e-5)


def test_resize_keeps_the_function_and_the_optimizer_state():
    ge = make(seed=0.5, reserve=0.25)
    optimizer = torch.optim.SGD(ge.weights(), lr=0.05, momentum=0.9)
    for _ in range(3):
        step(ge, optimizer)
    randomize(ge, torch.Generator().manual_seed(5))
    old, old_logits = ge.model, {k: g.weight.detach().clone() for k, g in ge.gates().items()}
    old_momentum = {k: ge.gate_optimizer.state[g.weight]["momentum_buffer"].clone() for k, g in ge.gates().items()}
    old_weights = {n: optimizer.state[p]["momentum_buffer"].clone() for n, p in old.named_parameters()
                   if p in optimizer.state}
    with torch.no_grad():
        before = old.eval()(X)
    mapping = ge.resize()
    optimizer = fxprune.remap_optimizer(optimizer, old, ge.model, mapping)
    with torch.no_grad():
        assert torch.allclose(ge.model.eval()(X), before, atol=1e-5)
    for key, g in ge.gates().items():
        s, on = old_logits[key], old_logits[key] > 0
        reserve = max(1, 2 - int(on.sum()), math.ceil(0.25 * int(on.sum())))
        if g.weight.numel() > 1:
            assert g.weight.numel() == int(on.sum()) + reserve, key  # the on units and a full reserve
            assert torch.equal(g.weight[g.weight > 0], s[on])  # on units keep their logits, in order
        src = mapping[f"gates.{key.replace('.', '_')}.weight"].index.get(0, torch.arange(g.weight.numel()))
        kept = src >= 0
        assert torch.equal(ge.gate_optimizer.state[g.weight]["momentum_buffer"][kept], old_momentum[key][src[kept]])
        assert torch.all(g.weight.detach()[~kept] == -ge.s0 / ge.beta)  # grown units: candidates, off
    for name, p in ge.model.named_parameters():
        if not name.startswith("gates."):
            carried = mapping[name].carry(old_weights[mapping[name].source], p.shape)
            assert torch.equal(optimizer.state[p]["momentum_buffer"], carried), name
    step(ge, optimizer)  # trains on


def test_resize_grows_a_group_whose_reserve_turned_on():
    ge = make(seed=0.5, reserve=0.25)
    ge.resize()
    name = ge.analysis.layers[0].groups[0]
    size = ge.gates()[name].weight.numel()
    with torch.no_grad():
        ge.gates()[name].weight.fill_(1.0)  # the reserve switched on
    ge.resize()
    grown = ge.gates()[name].weight.detach()
    assert len(grown) == size + math.ceil(0.25 * size)
    assert torch.all(grown[size:] < 0)  # new units start off, after the old ones
    assert fxprune.cost(ge.base, X).params > 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_resize_carries_the_analysis_a_fresh_one_would_give(seed):
    ge = make(seed=0.5, reserve=0.25)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(3):  # shrink, grow and keep groups over several resizes
        randomize(ge, generator)
        ge.resize()
        assert_same_analysis(ge.analysis, fxprune.analyze(ge.base, X))


def test_off_layer_is_dropped_once_unlikely():
    ge = make(layer_drop=0.01)
    name = ge.analysis.layers[0].name
    with torch.no_grad():
        ge.gates()[name].weight.fill_(-1.0)  # off, still sampled with p = 0.27
    ge.resize()
    assert name in {layer.name for layer in ge.analysis.layers}
    with torch.no_grad():
        ge.gates()[name].weight.fill_(-10.0)
    ge.resize()
    assert name not in {layer.name for layer in ge.analysis.layers}
    assert name not in ge.gates()


def test_gates_draw_together_once_per_pass_and_a_copy_draws_its_own():
    ge = make(seed=0.5)
    ge.model.train()(X)
    (sample,) = {id(g.sample): g.sample for g in ge.gates().values()}.values()  # one draw for every gate
    drawn = sample._values
    copied = copy.deepcopy(ge.model)  # after a pass: its sample (not a graph leaf) is not copied
    gates = [m for m in copied.modules() if isinstance(m, SampledGate)]
    assert all(g.sample is gates[0].sample for g in gates) and gates[0].sample is not sample
    widest = max(gates, key=lambda g: g.weight.numel())
    values, draws = [], []
    for seed in (1, 2, 1):
        torch.manual_seed(seed)
        copied(X)
        values.append(widest.values().detach().clone())
        draws.append(gates[0].sample._values)
    assert len({id(d) for d in draws}) == 3  # each pass of the copy draws anew
    assert torch.equal(values[0], values[2])  # from the global generator
    assert sample._values is drawn  # and leaves the original's draw alone


def test_rounded_architecture_is_what_compact_returns_and_what_the_controller_counts():
    ge = make(round_to=4)
    randomize(ge, torch.Generator().manual_seed(3))
    small, _ = ge.compact()
    assert ge.cost() == fxprune.cost(small, X)  # the controller's cost: the rounded model's
    counts = [m.weight.shape[0] for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert all(c % 4 == 0 or c == 8 for c in counts), counts
    unrounded = ge.compact(round_to=1)[0]
    assert fxprune.cost(unrounded, X).flops < ge.cost().flops  # rounding kept more units
    on = {key: int((g.weight > 0).sum()) for key, g in ge.gates().items() if g.weight.numel() > 1}
    ge.resize()  # room for the rounded architecture: at least ceil(on / 4) * 4 units, or the original's 8
    for key, n in on.items():
        assert ge.gates()[key].weight.numel() >= min(-(-n // 4) * 4, 8), key


@pytest.mark.parametrize("kwargs, match", [({"target": 0.0}, "target"), ({"target": 1.2}, "target"),
                                           ({"round_to": 0}, "round_to"), ({"epochs": 0}, "epochs")])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trains_resizes_and_compacts_on_the_gpu():
    torch.manual_seed(0)
    x, y = X.cuda(), Y.cuda()
    ge = GrowEfficient(Residual(8, 2).cuda(), x, epochs=5, seed=0.5, round_to=1)
    assert all(g.weight.is_cuda for g in ge.gates().values())
    optimizer = torch.optim.SGD(ge.weights(), lr=0.05, momentum=0.9)
    loss = F.cross_entropy(ge.model(x), y) + ge.penalty()
    loss.backward()
    optimizer.step()
    ge.gate_optimizer.step()
    old = ge.model
    mapping = ge.resize()
    fxprune.remap_optimizer(optimizer, old, ge.model, mapping)
    small, _ = ge.compact()
    with torch.no_grad():
        assert torch.allclose(ge.model.eval()(x), small.eval()(x), atol=1e-5)


def test_the_reserve_is_kept_only_below_the_target():
    sizes = {}
    for target, grows in ((0.9, True), (0.05, False)):
        ge = make(seed=0.5, reserve=0.5, target=target)
        assert (ge.fraction() < target) == grows
        ge.resize()
        sizes[grows] = {k: g.weight.numel() for k, g in ge.gates().items() if g.weight.numel() > 1}
    assert all(sizes[True][k] == 4 + 2 for k in sizes[True])  # 4 units on and half as many in reserve
    assert all(sizes[False][k] == 4 + 1 for k in sizes[False])  # the minimum: one


def test_a_model_with_nothing_to_gate_is_refused():
    with pytest.raises(ValueError, match="nothing|no exactly prunable"):
        GrowEfficient(nn.Linear(4, 3), torch.randn(2, 4), epochs=2)
