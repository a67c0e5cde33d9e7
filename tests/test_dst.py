"""Dynamic Sparse Training: the estimator, masked layers, penalty, reset, and exact compaction."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from fxprune.data import digits
from fxprune.methods import DST
from fxprune.methods.dst import LongTailedStep

DEAD = 1e3  # a threshold above every |W| (and every row norm): the row is entirely masked


def lenet_300_100(inputs: int = 64) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


class ResidualCNN(nn.Module):
    """stem and conv2 both produce the residual stream; every consumer of a removed channel is 1x1."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 1), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 5, 1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        s = F.relu(self.bn0(self.stem(x)))
        s = F.relu(s + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(s))))))
        return self.fc(F.relu(self.head(s)).mean((2, 3)))


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so a dead filter's constant is not zero."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) + 0.5)
    return model.eval()


def kill(dst: DST, layer: str, rows: list[int]) -> None:
    with torch.no_grad():
        dst.thresholds()[layer][rows] = DEAD


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_long_tailed_estimator():
    x = torch.tensor([-1.5, -0.9, -0.4, -0.1, 0.0, 0.2, 0.5, 1.0, 1.2], requires_grad=True)
    y = LongTailedStep.apply(x)
    assert y.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0, 0.4, 0.4, 1.6, 2, 1.2, 0.4, 0.4, 0]))


def test_threshold_gradient_and_penalty():
    torch.manual_seed(0)
    dst = DST(nn.Linear(4, 3), alpha=0.5)
    t = dst.thresholds()[""]
    dst.model(torch.randn(8, 4)).pow(2).sum().backward()
    assert t.grad is not None and bool((t.grad != 0).all()), "the estimator passes no gradient to t"
    opt = torch.optim.SGD([t], lr=0.1)
    opt.zero_grad()
    dst.penalty().backward()
    opt.step()
    torch.testing.assert_close(t.detach(), torch.full((3,), 0.1 * 0.5))  # d/dt alpha*exp(-t) = -alpha at t = 0


def test_threshold_reset_at_one_percent():
    model = nn.Sequential(nn.Linear(50, 2), nn.Linear(50, 2))
    with torch.no_grad():
        for m in model:
            m.weight.copy_(torch.arange(1, 101).reshape(2, 50) / 100)  # |W| = 0.01 ... 1.00
    dst = DST(model)
    with torch.no_grad():
        dst.thresholds()["0"].copy_(torch.tensor([1.0, 0.995]))  # keeps 1.00: 1 of 100 weights
        dst.thresholds()["1"].copy_(torch.tensor([1.0, 0.985]))  # keeps 0.99 and 1.00: 2%
    assert dst.densities() == {"0": 0.01, "1": 0.02}
    dst.after_step()
    assert dst.thresholds()["0"].tolist() == [0, 0]
    torch.testing.assert_close(dst.thresholds()["1"].detach(), torch.tensor([1.0, 0.985]))


def test_layer_selection():
    model = lenet_300_100()
    assert list(DST(model, layers=["1", "5"]).layers) == ["1", "5"]
    assert list(DST(model, layers=lambda name, m: m.out_features > 50).layers) == ["1", "3"]
    with pytest.raises(ValueError, match="'2'"):
        DST(model, layers=["2"])


def test_model_unchanged_and_finalize():
    torch.manual_seed(0)
    model = lenet_300_100()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(16, 64), torch.randint(10, (16,))
    dst = DST(model, alpha=0.1)
    opt = torch.optim.SGD(dst.model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        (F.cross_entropy(dst.model(x), y) + dst.penalty()).backward()
        opt.step()
        dst.after_step()
    final = dst.finalize()
    dst.compact(x)
    final_again = dst.finalize()  # finalizing leaves dst.model intact
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert [n for n, _ in final.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert type(final[1]) is nn.Linear and not any(parametrize.is_parametrized(m) for m in final.modules())
    assert dst.density() < 1
    torch.testing.assert_close(outputs(final, x), outputs(dst.model, x))
    torch.testing.assert_close(outputs(final_again, x), outputs(dst.model, x))


def test_structured_masks_whole_rows_and_compacts_residual_cnn():
    torch.manual_seed(0)
    model = randomize_batchnorm(ResidualCNN())
    x = torch.randn(4, 3, 6, 6)
    dst = DST(model, structured=True)
    kill(dst, "stem", [1, 3])
    kill(dst, "conv2", [3, 5])  # stream channel 3 is dead in both producers, 1 and 5 in one only
    kill(dst, "conv1", [0, 2])
    kill(dst, "head", [4])
    kill(dst, "fc", [0])  # the classifier reaches the output: never removed
    final = dst.finalize()
    for name, dead in {"stem": [1, 3], "conv2": [3, 5], "conv1": [0, 2], "head": [4], "fc": [0]}.items():
        w, original = final.get_submodule(name).weight, model.get_submodule(name).weight
        rows = torch.ones(len(w), dtype=torch.bool)
        rows[dead] = False
        assert bool((w[~rows] == 0).all()) and torch.equal(w[rows], original[rows])
    dead, total = 2 * 27 + 2 * 8 + 2 * 6 + 8 + 5, 8 * 27 + 6 * 8 + 8 * 6 + 5 * 8 + 4 * 5  # rows of stem, conv1, ...
    assert dst.density() == pytest.approx(1 - dead / total)

    masks = dst.masks(x)
    removed = {k: torch.nonzero(~v).flatten().tolist() for k, v in masks.items()}
    assert removed == {"stem": [3], "conv1": [0, 2], "head": [4]}
    small = dst.compact(x)
    torch.testing.assert_close(outputs(small, x), outputs(final, x), atol=1e-5, rtol=1e-5)
    widths = small.stem.out_channels, small.conv1.out_channels, small.head.out_channels, small.fc.out_features
    assert widths == (7, 4, 4, 4)
    assert any(a.action == "folded" for a in small.meta["fxprune_report"])


@pytest.mark.parametrize("layers, width, actions", [
    # the constant meets zero padding: not foldable, the filter stays
    ([nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)], 4, ["kept"]),
    # a BatchNorm after the ReLU, where compact itself sees a constant (BN(0)) in the removed channel
    ([nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)], 3, ["folded"]),
])
def test_dead_filter_constant(layers, width, actions):
    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), *layers))
    with torch.no_grad():
        model[0].bias.fill_(0.5)
    x = torch.randn(2, 3, 5, 5)
    dst = DST(model)
    kill(dst, "0", [1])
    assert torch.nonzero(~dst.masks(x)["0"]).flatten().tolist() == [1]
    small = dst.compact(x)
    assert small.get_submodule("0").out_channels == width
    assert sorted({a.action for a in small.meta["fxprune_report"]}) == actions
    torch.testing.assert_close(outputs(small, x), outputs(dst.finalize(), x), atol=1e-5, rtol=1e-5)


def test_dead_neurons_of_mlp_compact_exactly():
    torch.manual_seed(0)
    model = lenet_300_100(16)
    with torch.no_grad():
        model[1].bias.uniform_(0.1, 0.5)  # dead neurons still output relu(bias) > 0
    x = torch.randn(32, 16)
    dst = DST(model)
    with torch.no_grad():
        dst.thresholds()["1"][:] = 0.1  # partially masked rows stay
    kill(dst, "1", list(range(0, 300, 3)))
    kill(dst, "3", [5, 7])
    small = dst.compact(x)
    assert (small.get_submodule("1").out_features, small.get_submodule("3").out_features) == (200, 98)
    torch.testing.assert_close(outputs(small, x), outputs(dst.finalize(), x), atol=1e-5, rtol=1e-5)
    kill(dst, "3", list(range(100)))  # a layer without a live neuron is left whole, not removed
    assert "3" not in dst.masks(x) and "1" in dst.masks(x)


def test_training_on_digits_sparsifies():
    torch.manual_seed(0)
    train, test = digits()
    dst = DST(lenet_300_100(), alpha=0.02)
    opt = torch.optim.SGD(dst.model.parameters(), lr=0.01, momentum=0.9)
    x, y = train.tensors
    for _ in range(100):
        batch = torch.randint(len(x), (64,))
        opt.zero_grad()
        (F.cross_entropy(dst.model(x[batch]), y[batch]) + dst.penalty()).backward()
        opt.step()
        dst.after_step()
    xt, yt = test.tensors
    accuracy = float((outputs(dst.model, xt).argmax(1) == yt).float().mean())
    assert dst.density() < 0.5 and accuracy > 0.7, (dst.density(), accuracy)
    assert f"{dst.density():.2%}" in dst.report().splitlines()[-1]
    small = dst.compact(xt[:8])
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in dst.finalize().parameters())
    torch.testing.assert_close(outputs(small, xt), outputs(dst.finalize(), xt), atol=1e-5, rtol=1e-5)
