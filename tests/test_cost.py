import pytest
import torch
from torch import nn

from fxprune.cost import Cost, cost


def test_linear_closed_form():
    c = cost(nn.Linear(16, 8), torch.randn(4, 16))
    assert c == Cost(flops=2 * 4 * 16 * 8, params=16 * 8 + 8)


def test_conv2d_closed_form():
    conv = nn.Conv2d(3, 6, kernel_size=3, stride=2, padding=1, groups=3)
    c = cost(conv, (torch.randn(2, 3, 10, 10),))
    out_hw = 5 * 5
    assert c.flops == 2 * 2 * 6 * out_hw * (3 // 3) * 3 * 3
    assert c.params == 6 * 1 * 3 * 3 + 6


def test_multiple_inputs():
    class Bilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 3, bias=False)
            self.b = nn.Linear(7, 3, bias=False)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    c = cost(Bilinear(), (torch.randn(2, 5), torch.randn(2, 7)))
    assert c == Cost(flops=2 * 2 * (5 + 7) * 3, params=(5 + 7) * 3)


def test_shared_parameters_counted_once():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    c = cost(nn.Sequential(a, b), torch.randn(1, 4))
    assert c == Cost(flops=2 * 2 * 16, params=16 + 4 + 4)


def test_reused_and_tied_modules_keep_their_parameters():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, b, a)
    before = {id(m): dict(m._parameters) for m in model.modules()}
    assert cost(model, torch.randn(1, 4)) == Cost(flops=3 * 2 * 16, params=16 + 4 + 4)
    for m in model.modules():
        assert all(p is before[id(m)][n] for n, p in m._parameters.items())
    assert b.weight is a.weight


def test_model_not_mutated_in_train_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 8, 8)
    x_before = x.clone()
    cost(model, x)
    assert model.training
    assert x.equal(x_before)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(before[k].equal(after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_data_dependent_control_flow_falls_back_without_mutation():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            x = self.bn(self.fc(x))
            return x if x.sum() > 0 else -x

    model = Gate().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert cost(model, torch.randn(2, 4)) == Cost(flops=2 * 2 * 4 * 4, params=4 * 4 + 4 + 4 + 4)
    assert all(before[k].equal(v) for k, v in model.state_dict().items())


def test_str_is_readable():
    assert str(Cost(flops=1_500_000, params=2_340)) == "1.50M FLOPs, 2.34K params"
    assert str(Cost(flops=12, params=3)) == "12 FLOPs, 3 params"


@pytest.mark.parametrize("cls, gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_recurrent_layers_count_their_gate_products(cls, gates):
    """On CPU an RNN runs as one fused oneDNN op unless disabled; cost must still count its gates."""
    steps, features, hidden = 5, 4, 8
    model = cls(features, hidden, num_layers=2)
    got = cost(model, torch.randn(steps, 1, features)).flops
    per_step = gates * hidden * (features + hidden) + gates * hidden * (hidden + hidden)
    assert got == 2 * steps * per_step
