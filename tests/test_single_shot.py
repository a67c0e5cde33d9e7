"""SingleShot (3SP): gate sensitivities, compute-aware scores, the global ranking and the budget."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.methods import SingleShot

from test_budget import Residual

X = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.arange(16) % 10


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def test_a_residual_stream_is_scored_once_as_the_sum_over_its_producers():
    """The stream's gate multiplies the output of the stem and of each block: its gradient is the
    sum of what each producer's output contributes, d L / d out * out, over the unit's channel."""
    torch.manual_seed(0)
    model = randomize_batchnorm(Residual(8, 2)).eval()
    ss = SingleShot(model, X[:2])
    stream = ss.analysis.groups[0]
    assert stream.producers == ["stem", "blocks.0.conv2", "blocks.1.conv2"]
    outputs = []
    hooks = [model.get_submodule(name).register_forward_hook(lambda m, a, out: outputs.append(out))
             for name in ("bn", "blocks.0.bn2", "blocks.1.bn2")]  # where the gate sits: after the BatchNorm
    loss = F.cross_entropy(model(X), Y)
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(loss, outputs)
    total = sum((o * g).sum((0, 2, 3)) for o, g in zip(outputs, grads))
    sensitivities = ss.sensitivities((X, Y), F.cross_entropy)
    assert set(sensitivities) == {g.name for g in ss.analysis.groups if g.prunable}
    assert torch.allclose(sensitivities[stream.name], total.abs(), atol=1e-6)
    one = (outputs[0] * grads[0]).sum((0, 2, 3)).abs()
    assert not torch.allclose(sensitivities[stream.name], one, atol=1e-6)


def test_scores_are_sensitivities_per_unit_of_cost():
    model = Residual(8, 2)
    ss = SingleShot(model, X[:2])
    sensitivities = ss.sensitivities((X, Y), F.cross_entropy)
    for metric in ("flops", "params"):
        costs = ss.budget.unit_costs(metric)
        for key, score in ss.scores((X, Y), F.cross_entropy, metric).items():
            assert torch.allclose(score, sensitivities[key] / costs[key])


def test_batchnorm_is_in_eval_mode_while_scoring():
    """In training mode BatchNorm's scale invariance makes a gate before it useless; the scores use
    the running statistics, so they do not depend on the model's mode."""
    model = randomize_batchnorm(Residual(8, 2))
    evaluated = SingleShot(model.eval(), X[:2]).sensitivities((X, Y), F.cross_entropy)
    running = model.blocks[0].bn1.running_mean.clone()
    train = SingleShot(model.train(), X[:2]).sensitivities((X, Y), F.cross_entropy)
    assert all(torch.equal(train[k], evaluated[k]) for k in train)
    assert model.training and torch.equal(model.blocks[0].bn1.running_mean, running)  # the model is untouched


def test_a_unit_with_zero_gradient_goes_first():
    """Hidden unit 5 reaches nothing: its gradient is zero, so it is the one unit removed when the
    budget asks for one unit's worth."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight[:, 5] = 0
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    ss = SingleShot(model, x[:1])
    (group,) = ss.budget.groups
    scores = ss.scores((x, y), F.cross_entropy)[group]
    assert float(scores[5]) == 0 and int(scores.argmin()) == 5 and bool((scores[torch.arange(16) != 5] > 0).all())
    masks = ss.masks((x, y), F.cross_entropy, target=0.95, round_to=1)  # one unit is 12/192 = 6.25% of the FLOPs
    assert (~masks[group]).nonzero().flatten().tolist() == [5]


@pytest.mark.parametrize("metric", ["flops", "params"])
@pytest.mark.parametrize("target", [0.3, 0.6])
def test_budget_is_reached_with_the_fewest_removals(metric, target):
    torch.manual_seed(0)
    model = Residual(16, 3)
    ss = SingleShot(model, X[:2])
    scores = ss.scores((X, Y), F.cross_entropy, metric)
    masks = ss.rank(scores, target, metric)
    dense, small = fxprune.cost(model, X[:2]), fxprune.cost(ss.compact(masks, round_to=1), X[:2])
    assert getattr(small, metric) <= target * getattr(dense, metric)
    assert all(bool(m.any()) for m in masks.values())  # no group is emptied: no layer goes
    # every removed unit scores no higher than any kept one, each group's best aside
    removed = [(float(scores[k][u]), k, int(u)) for k, m in masks.items() for u in (~m).nonzero().flatten()]
    kept = [float(scores[k][u]) for k, m in masks.items() for u in m.nonzero().flatten() if u != scores[k].argmax()]
    assert max(removed)[0] <= min(kept)
    # and keeping the best removed unit would exceed the budget: the removals are the fewest
    _, key, unit = max(removed)
    masks[key][unit] = True
    assert getattr(fxprune.cost(ss.compact(masks, round_to=1), X[:2]), metric) > target * getattr(dense, metric)


def test_masks_and_compact_round_to_8_by_default_and_meet_the_target():
    """masks() ranks for the rounding compact() does by default, so the default pair meets the target."""
    torch.manual_seed(0)
    model = Residual(24, 2)
    ss = SingleShot(model, X[:2])
    masks = ss.masks((X, Y), F.cross_entropy, target=0.5)
    assert all(int(m.sum()) % 8 == 0 or bool(m.all()) for m in masks.values())
    small = ss.compact(masks)
    assert fxprune.cost(small, X[:2]).flops <= 0.5 * fxprune.cost(model, X[:2]).flops
    assert all(m.out_channels % 8 == 0 for m in small.modules() if isinstance(m, nn.Conv2d))


def test_unreachable_target_warns_and_keeps_one_unit_per_group():
    ss = SingleShot(Residual(8, 2), X[:2])
    with pytest.warns(UserWarning, match="out of reach"):
        masks = ss.masks((X, Y), F.cross_entropy, target=1e-6, round_to=1)
    assert all(int(m.sum()) == 1 for m in masks.values())


def test_compact_is_exact_and_reinit_resets():
    torch.manual_seed(0)
    model = randomize_batchnorm(Residual(8, 2)).eval()
    ss = SingleShot(model, X[:2])
    masks = ss.masks((X, Y), F.cross_entropy, target=0.5)
    small = ss.compact(masks).eval()
    with torch.no_grad():
        assert torch.allclose(small(X), fxprune.apply_masks(model, masks, X[:2]).eval()(X), atol=1e-5)
    torch.manual_seed(1)
    fresh = ss.compact(masks, reinit=True)
    for (name, p), q in zip(small.named_parameters(), fresh.parameters()):
        assert p.shape == q.shape
        if name.endswith("conv1.weight"):
            assert not torch.equal(p, q), name
    assert all(float(m.running_var.min()) == 1.0 for m in fresh.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("target", [0.0, 1.5])
def test_target_outside_the_unit_interval_is_refused(target):
    with pytest.raises(ValueError, match="target"):
        SingleShot(Residual(8, 2), X[:2]).masks((X, Y), F.cross_entropy, target=target)


@pytest.mark.parametrize("target", [0.3, 0.6])
def test_rounded_ranking_keeps_multiples_and_meets_the_target_after_rounding(target):
    torch.manual_seed(0)
    model = Residual(12, 2)
    ss = SingleShot(model, X[:2])
    masks = ss.masks((X, Y), F.cross_entropy, target=target, round_to=4)
    sizes = {g.name: g.size for g in ss.analysis.groups}
    assert all(int(m.sum()) % 4 == 0 or int(m.sum()) == sizes[k] for k, m in masks.items())
    small = ss.compact(masks, reinit=True, round_to=4)  # trained from scratch: the rounded units count too
    assert fxprune.cost(small, X[:2]).flops <= target * fxprune.cost(model, X[:2]).flops
    unrounded = ss.masks((X, Y), F.cross_entropy, target=target, round_to=1)
    assert any(int(m.sum()) % 4 for m in unrounded.values())  # rounding changed something
