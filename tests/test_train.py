"""fit: training with physical resizing, carried optimizers and schedulers, history and plot."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, Subset

import fxprune
from fxprune.data import digits
from fxprune.methods import DST, GrowEfficient, fit
from fxprune.methods.train import TRAIN_FLOPS_PER_FORWARD

from test_budget import Residual


@pytest.fixture(scope="module")
def data():
    train, test = digits()
    return train, DataLoader(Subset(test, range(200)), batch_size=200)


def loader(train, seed: int = 0) -> DataLoader:
    return DataLoader(train, batch_size=64, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed))


def check_optimizers(ge: GrowEfficient, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Both optimizers hold exactly the current parameters, with state; the scheduler follows."""
    weights = list(ge.weights())
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in weights}
    assert all(p in optimizer.state for p in weights)
    assert all(g.weight in ge.gate_optimizer.state for g in ge.gates().values())
    assert scheduler.optimizer is optimizer
    assert optimizer.param_groups[0]["lr"] == pytest.approx(scheduler.get_last_lr()[0])


@pytest.mark.parametrize("seed, target, grows", [(0.25, 0.6, True), (1.0, 0.3, False)])
def test_grow_efficient_resizes_physically(data, seed, target, grows):
    train, test = data
    torch.manual_seed(0)
    x = train.tensors[0][:2]
    ge = GrowEfficient(Residual(12, 2), x, target=target, epochs=2, seed=seed, lam=2.0, round_to=1)
    ge.resize()  # start at the seed's physical size
    start = fxprune.cost(ge.base, x).params
    optimizer = torch.optim.SGD(ge.weights(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    result = fit(ge, loader(train), 2, optimizer, schedulers=[scheduler], resize_every=8, test_data=test,
                 progress=False)
    history = result.history
    assert len(history) == 2 * len(loader(train)) and all(math.isfinite(r.loss) for r in history)
    physical = fxprune.cost(ge.base, x).params
    if grows:  # the seed grows toward the budget, physically
        assert history[-1].params > history[0].params and physical > start
    else:
        assert history[-1].params < history[0].params and physical < start
    assert ge.fraction() == pytest.approx(target, abs=0.15)
    check_optimizers(ge, result.optimizer, scheduler)
    assert scheduler.last_epoch == len(history)  # the schedule went on across every resize
    assert fxprune.cost(result.model, x) == ge.cost()  # the final model is the final architecture
    assert history[-1].test_accuracy is not None


def test_dst_trains_then_compacts(data):
    train, _ = data
    torch.manual_seed(0)
    dst = DST(Residual(8, 2), alpha=5e-4, structured=True)
    optimizer = torch.optim.SGD(dst.model.parameters(), lr=0.05, momentum=0.9)
    result = fit(dst, loader(train), 1, optimizer, progress=False)
    x = train.tensors[0][:1]
    dense = fxprune.cost(Residual(8, 2), x)
    assert isinstance(result.model, torch.fx.GraphModule)
    assert fxprune.cost(result.model, x).params <= dense.params
    spent = [0.0] + [r.train_flops for r in result.history]
    per_step = [b - a for a, b in zip(spent, spent[1:])]
    assert per_step == pytest.approx([TRAIN_FLOPS_PER_FORWARD * dense.flops * 64] * len(result.history))


def test_plain_module_history_and_plot(data, tmp_path):
    train, test = data
    torch.manual_seed(0)
    model = Residual(8, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    result = fit(model, loader(train), 2, optimizer, test_data=test, plot=tmp_path / "history.png", progress=False)
    assert result.model is model
    steps = len(loader(train))
    assert [r.step for r in result.history] == list(range(1, 2 * steps + 1))
    assert [r.test_accuracy is not None for r in result.history].count(True) == 2
    losses = [r.loss for r in result.history]
    assert sum(losses[-5:]) < sum(losses[:5])  # it learns
    pairs = zip(result.history, result.history[1:])
    assert all(b.seconds >= a.seconds and b.train_flops > a.train_flops for a, b in pairs)
    assert (tmp_path / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
