"""The tensor mapping of a rewrite (fxprune/mapping.py) and carrying an optimizer over it
(fxprune/optim.py).

The mapping: every tensor of a compact model is its source tensor restricted by the mapping
(torchvision CNN, an LSTM rebuilt as a RecurrentStack, tied weights). remap_optimizer: after a
compaction (channel masks and removed layers) the new optimizer takes the step the old one takes on
the masked reference, for SGD with momentum, Adam, AdamW and AMSGrad; hyperparameters, parameter
groups, schedulers, frozen parameters and grown parameters are carried as documented.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as LR

import fxprune
from fxprune.modules.recurrent import RecurrentStack
from test_layers import case, snapshot

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")


def compact(model, masks, x, analysis=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxprune.compact(model, masks, x, analysis, return_mapping=True)


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def resnet_masks(analysis, seed: int = 0, layers=("layer1.1", "layer3.1")) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for grp in analysis.groups:
        if grp.prunable and grp.size > 1:
            keep = torch.rand(grp.size, generator=g) > 0.4
            keep[0] = True
            masks[grp.name] = keep
    masks.update({name: False for name in layers})
    return masks


# --------------------------------------------------------------------------------------------
# 1. the mapping
# --------------------------------------------------------------------------------------------

def test_compact_mapping_rebuilds_every_tensor_resnet18():
    model, x, analysis = case("resnet18")
    masks = resnet_masks(analysis)
    small, mapping = compact(model, masks, x, analysis)
    assert small.meta["fxprune_report"] == []  # nothing folded: every tensor is a restriction
    old, new = tensors(model), tensors(small)
    assert set(mapping) == set(new)
    for name, t in new.items():
        m = mapping[name]
        assert m.source == name
        for dim, idx in m.index.items():
            assert len(idx) == t.shape[dim] and bool((idx >= 0).all()) and bool((idx[1:] > idx[:-1]).all())
        assert torch.equal(m.carry(old[m.source], t.shape), t.detach()), name
    kept = int(masks["layer1.0.conv1"].sum())
    assert mapping["layer1.0.conv1.weight"].index[0].tolist() == masks["layer1.0.conv1"].nonzero().flatten().tolist()
    assert small.get_parameter("layer1.0.conv2.weight").shape[1] == kept
    assert not any(name.startswith(("layer1.1.", "layer3.1.")) for name in mapping)


class LSTMNet(nn.Module):
    """Embedding -> 2-layer bidirectional LSTM -> Linear -> decoder tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.rnn = nn.LSTM(6, 5, num_layers=2, bidirectional=True)
        self.fc = nn.Linear(10, 6)
        self.dec = nn.Linear(6, 11)
        self.dec.weight = self.emb.weight

    def forward(self, x):
        return self.dec(self.fc(self.rnn(self.emb(x))[0]))


def bools(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


def test_mapping_through_a_recurrent_stack_and_tied_weights():
    torch.manual_seed(0)
    model, x = LSTMNet().eval(), torch.randint(0, 11, (4, 2))
    masks = {"rnn.hidden_l0": bools(1, 0, 1, 1, 0), "rnn.hidden_l0_reverse": bools(1, 1, 0, 0, 0),
             "rnn.hidden_l1": bools(0, 1, 1, 1, 1), "emb": bools(1, 0, 1, 1, 0, 1)}
    small, mapping = compact(model, masks, x)
    assert isinstance(small.rnn, RecurrentStack)
    old, new = tensors(model), tensors(small)
    assert set(mapping) == set(new)
    sources = {name: mapping[name].source for name in new}
    # layer 0 has directions of different widths (3 and 2 units): a module each
    assert sources["rnn.layers.0.0.weight_ih_l0"] == "rnn.weight_ih_l0"
    assert sources["rnn.layers.0.1.weight_hh_l0"] == "rnn.weight_hh_l0_reverse"
    assert sources["rnn.layers.0.1.bias_ih_l0"] == "rnn.bias_ih_l0_reverse"
    assert sources["rnn.layers.1.0.weight_hh_l0"] == "rnn.weight_hh_l1"
    assert sources["rnn.layers.1.1.weight_ih_l0"] == "rnn.weight_ih_l1_reverse"
    for name, t in new.items():
        assert torch.equal(mapping[name].carry(old[sources[name]], t.shape), t.detach()), name
    # the kept rows of every gate block
    rows = mapping["rnn.layers.0.1.weight_ih_l0"].index[0]
    assert rows.tolist() == [0, 1, 5, 6, 10, 11, 15, 16]
    # the tied weight is one tensor, under both names
    assert small.dec.weight is small.emb.weight
    assert sources["emb.weight"] == "emb.weight" and sources["dec.weight"] == "dec.weight"
    assert mapping["emb.weight"].index[1].tolist() == [0, 2, 3, 5]
    assert mapping["dec.weight"].index[1].tolist() == [0, 2, 3, 5]


def test_carry_fills_new_entries():
    old = torch.arange(12.0).reshape(3, 4)
    m = fxprune.TensorMap("w", {0: torch.tensor([2, -1, 0]), 1: torch.tensor([-1, 3, 1])})
    got = m.carry(old, torch.Size([3, 3]), fill=-7.0)
    assert got.tolist() == [[-7, 11, 9], [-7, -7, -7], [-7, 3, 1]]
    assert fxprune.TensorMap(None).carry(old, torch.Size([2, 2])).tolist() == [[0, 0], [0, 0]]
    assert fxprune.TensorMap("w").carry(old, old.shape).tolist() == old.tolist()


def test_carry_returns_a_new_tensor():
    """Regression: TensorMap.carry returned ``old.detach()`` when no dim changed, sharing storage
    with the old tensor, so remap_optimizer's state for every unchanged parameter aliased the old
    optimizer's (test_stepping_the_new_optimizer_leaves_the_old_one)."""
    old = torch.zeros(3)
    new = fxprune.TensorMap("w").carry(old, old.shape)
    new += 1
    assert old.tolist() == [0, 0, 0]
    new = fxprune.TensorMap("w", {0: torch.arange(3)}).carry(old, old.shape)
    new += 1
    assert old.tolist() == [0, 0, 0]


# --------------------------------------------------------------------------------------------
# 2. the optimizer takes the same step
# --------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.9)),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-2),
}


def loss_of(model, x):
    return (model(x) - 0.1).square().mean()


def train(model, optimizer, batches) -> None:
    for batch in batches:
        optimizer.zero_grad()
        loss_of(model, batch).backward()
        optimizer.step()


def assert_restricted(small, mapping, reference, what: str, rtol: float = 1e-5) -> None:
    """Every parameter of ``small`` equals its source in ``reference``, restricted by ``mapping``
    (within ``rtol`` of the tensor's scale)."""
    ref = dict(reference.named_parameters())
    for name, p in small.named_parameters():
        want = mapping[name].carry(ref[mapping[name].source], p.shape)
        scale = float(want.abs().max().clamp(min=1e-6))
        torch.testing.assert_close(p.detach(), want, rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, name=name: f"{what}: {name}: {m}")


def remapped_step(model, x, masks, make, batches, training: bool = False):
    """Train the masked reference for ``batches``, compact its weights, remap its optimizer and take
    one more step on both. Returns (compact model, mapping, reference after the step, the remapped
    optimizer, the reference optimizer before the step)."""
    reference = fxprune.apply_masks(model, masks, x).train(training)
    optimizer = make(reference.parameters())
    train(reference, optimizer, batches)
    trained = copy.deepcopy(model)
    trained.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.endswith("_channel_mask")})
    small, mapping = compact(trained, masks, x)
    small.train(training)
    # the expected step: the reference optimizer, on an independent copy of the reference
    expected, expected_opt = copy.deepcopy((reference, optimizer))
    remapped = fxprune.remap_optimizer(optimizer, reference, small, mapping)
    train(small, remapped, [batches[0]])
    train(expected, expected_opt, [batches[0]])
    return small, mapping, expected, remapped, optimizer


@pytest.mark.parametrize("which", sorted(OPTIMIZERS))
def test_remapped_optimizer_takes_the_same_step_resnet18(which):
    model, x, analysis = case("resnet18")
    batches = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    masks = resnet_masks(analysis)
    small, mapping, expected, remapped, _ = remapped_step(model, batches[0], masks, OPTIMIZERS[which], batches)
    assert type(remapped) is type(OPTIMIZERS[which]([nn.Parameter(torch.zeros(1))]))
    assert_restricted(small, mapping, expected, which, rtol=1e-4)
    # the state went along: per entry for tensors, copied for the step count
    for p in remapped.param_groups[0]["params"]:
        assert p in remapped.state


def test_remapped_optimizer_in_train_mode():
    """Train-mode BatchNorm: the same step within float noise."""
    model, x, analysis = case("resnet18")
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    small, mapping, expected, _, _ = remapped_step(model, batches[0], resnet_masks(analysis, 1),
                                                   OPTIMIZERS["sgd-momentum"], batches, training=True)
    assert_restricted(small, mapping, expected, "train mode", rtol=1e-3)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 1),
                                   nn.BatchNorm2d(8))
        self.c2 = nn.Conv2d(8, 5, 1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu(self.bn1(self.c1(x)))
        h = torch.relu(h + self.block(h))
        return self.fc(self.c2(h).mean((2, 3)))


def small_cnn():
    torch.manual_seed(0)
    return SmallCNN().eval(), torch.randn(2, 3, 6, 6)


@pytest.mark.parametrize("which", sorted(OPTIMIZERS))
def test_remapped_optimizer_state_is_sliced(which):
    model, x = small_cnn()
    masks = {"c1": bools(1, 0, 1, 1, 0, 1, 1, 0), "block.0": bools(0, 1, 1, 0, 1, 1)}
    reference = fxprune.apply_masks(model, masks, x)
    optimizer = OPTIMIZERS[which](reference.parameters())
    train(reference, optimizer, [x, x * 0.5])
    small, mapping = compact(model, masks, x)
    remapped = fxprune.remap_optimizer(optimizer, reference, small, mapping)
    ref = dict(reference.named_parameters())
    for name, p in small.named_parameters():
        old_state, new_state = optimizer.state[ref[mapping[name].source]], remapped.state[p]
        assert set(new_state) == set(old_state), name
        for key, value in old_state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                assert torch.equal(new_state[key], mapping[name].carry(value, p.shape)), (name, key)
            else:  # the step count
                assert float(new_state[key]) == float(value)


def test_remapped_optimizer_with_only_layers_removed():
    model, x = small_cnn()
    small, mapping, expected, remapped, _ = remapped_step(model, x, {"block": False}, OPTIMIZERS["adamw"],
                                                          [x, x.flip(0)])
    assert not any(n.startswith("block.") for n, _ in small.named_parameters())
    assert_restricted(small, mapping, expected, "layer removed", rtol=1e-4)
    assert sum(len(g["params"]) for g in remapped.param_groups) == len(list(small.parameters()))


# --------------------------------------------------------------------------------------------
# 3. what is carried over
# --------------------------------------------------------------------------------------------

def two_groups(model: nn.Module, cls=torch.optim.SGD, **kw):
    first = [p for n, p in model.named_parameters() if n.startswith(("c1", "bn1", "block"))]
    rest = [p for n, p in model.named_parameters() if not n.startswith(("c1", "bn1", "block"))]
    return cls([{"params": first, "lr": 0.1, "weight_decay": 1e-2}, {"params": rest, "lr": 0.01}], **kw)


def test_hyperparameters_and_groups_are_kept():
    model, x = small_cnn()
    masks = {"c1": bools(1, 0, 1, 1, 0, 1, 1, 0), "c2": bools(1, 1, 0, 1, 1)}
    optimizer = two_groups(model, torch.optim.SGD, momentum=0.9, dampening=0.1, lr=0.5)
    train(model, optimizer, [x])
    small, mapping = compact(model, masks, x)
    remapped = fxprune.remap_optimizer(optimizer, model, small, mapping)
    assert type(remapped) is torch.optim.SGD and remapped.defaults == optimizer.defaults
    assert len(remapped.param_groups) == 2
    for old, new in zip(optimizer.param_groups, remapped.param_groups):
        assert {k: v for k, v in old.items() if k != "params"} == {k: v for k, v in new.items() if k != "params"}
    names = {id(p): n for n, p in small.named_parameters()}
    assert {names[id(p)].split(".")[0] for p in remapped.param_groups[0]["params"]} == {"c1", "bn1", "block"}
    assert {names[id(p)].split(".")[0] for p in remapped.param_groups[1]["params"]} == {"c2", "fc"}
    assert sum(len(g["params"]) for g in remapped.param_groups) == len(list(small.parameters()))


def test_remap_does_not_change_the_old_optimizer():
    model, x = small_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, optimizer, [x, x])
    before = copy.deepcopy(optimizer.state_dict())
    groups = [dict(g) for g in optimizer.param_groups]
    small, mapping = compact(model, {"c1": bools(1, 0, 1, 1, 0, 1, 1, 0), "block": False}, x)
    fxprune.remap_optimizer(optimizer, model, small, mapping)
    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert [g["params"] for g in optimizer.param_groups] == [g["params"] for g in groups]
    for k, s in before["state"].items():
        for key, v in s.items():
            assert torch.equal(after["state"][k][key], v)


def test_stepping_the_new_optimizer_leaves_the_old_one():
    """Regression: the new optimizer's state tensors of unchanged parameters were views of the old
    optimizer's, so a step of the new optimizer changed the old optimizer's momentum."""
    model, x = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, optimizer, [x, x])
    small, mapping = compact(model, {"c1": bools(1, 0, 1, 1, 0, 1, 1, 0)}, x)
    remapped = fxprune.remap_optimizer(optimizer, model, small, mapping)
    before = copy.deepcopy(optimizer.state_dict())
    train(small, remapped, [x])
    after = optimizer.state_dict()
    changed = [k for k, s in before["state"].items() if not torch.equal(after["state"][k]["momentum_buffer"],
                                                                         s["momentum_buffer"])]
    assert changed == [], f"stepping the new optimizer changed the old one's state of {len(changed)} parameters"


@pytest.mark.parametrize("make", [
    lambda opt: LR.StepLR(opt, 2, gamma=0.5),
    lambda opt: LR.CosineAnnealingLR(opt, T_max=7),
    lambda opt: LR.SequentialLR(opt, [LR.ConstantLR(opt, 0.5, total_iters=2), LR.ExponentialLR(opt, 0.9)], milestones=[3]),
], ids=["StepLR", "CosineAnnealingLR", "SequentialLR"])
def test_scheduler_keeps_its_schedule(make):
    model, x = small_cnn()
    masks = {"c1": bools(1, 0, 1, 1, 0, 1, 1, 0), "block": False}

    def lrs(rewrite_at: int | None) -> list[list[float]]:
        net = copy.deepcopy(model)
        optimizer = two_groups(net, torch.optim.SGD, momentum=0.9)
        scheduler = make(optimizer)
        seen = []
        for step in range(8):
            if step == rewrite_at:
                small, mapping = compact(net, masks, x)
                optimizer = fxprune.remap_optimizer(optimizer, net, small, mapping, schedulers=[scheduler])
                assert scheduler.optimizer is optimizer
                net = small
            train(net, optimizer, [x])
            scheduler.step()
            seen.append([g["lr"] for g in optimizer.param_groups])
        return seen

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "lr_scheduler.step() before optimizer.step()"
        assert lrs(3) == lrs(None)


def test_a_scheduler_of_another_optimizer_is_refused():
    model, x = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(model.parameters(), lr=0.1), 1)
    small, mapping = compact(model, {"c1": bools(1, 0, 1, 1, 0, 1, 1, 0)}, x)
    with pytest.raises(fxprune.FxpruneError, match="StepLR"):
        fxprune.remap_optimizer(optimizer, model, small, mapping, schedulers=[other])


def test_a_frozen_parameter_stays_out():
    model, x = small_cnn()
    model.c1.weight.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    train(model, optimizer, [x])
    small, mapping = compact(model, {"c1": bools(1, 0, 1, 1, 0, 1, 1, 0)}, x)
    remapped = fxprune.remap_optimizer(optimizer, model, small, mapping)
    params = [p for g in remapped.param_groups for p in g["params"]]
    assert not any(p is small.c1.weight for p in params)
    assert len(params) == len(list(small.parameters())) - 1


def test_a_mapping_without_a_parameter_is_refused():
    model, x = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    small, mapping = compact(model, {"c1": bools(1, 0, 1, 1, 0, 1, 1, 0)}, x)
    with pytest.raises(fxprune.FxpruneError, match="'fc.bias'"):
        fxprune.remap_optimizer(optimizer, model, small, {k: v for k, v in mapping.items() if k != "fc.bias"})
    with pytest.raises(fxprune.FxpruneError, match="'fc.weight'"):
        fxprune.remap_optimizer(optimizer, model, small, {**mapping, "fc.weight": fxprune.TensorMap("nope")})


# --------------------------------------------------------------------------------------------
# 4. grown parameters
# --------------------------------------------------------------------------------------------

def test_grown_parameters_get_fresh_state_and_the_group_before_them():
    model, x = small_cnn()
    optimizer = two_groups(model, torch.optim.Adam)
    train(model, optimizer, [x, x])
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grown, mapping = fxprune.grow(model, x, widen={"c1": 2, "c2": 1}, insert={"block": "copy"})
    remapped = fxprune.remap_optimizer(optimizer, model, grown, mapping)
    group_of = {id(p): i for i, g in enumerate(remapped.param_groups) for p in g["params"]}
    named = list(grown.named_parameters())
    assert sorted(group_of) == sorted(id(p) for _, p in named)
    old = dict(model.named_parameters())
    old_group = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    for i, (name, p) in enumerate(named):
        m = mapping[name]
        if m.source is None:  # new: no state, the group of the parameter before it
            assert not remapped.state.get(p), name
            assert group_of[id(p)] == (group_of[id(named[i - 1][1])] if i else 0), name
            continue
        assert group_of[id(p)] == old_group[id(old[m.source])], name
        state = remapped.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            want = m.carry(optimizer.state[old[m.source]][key], p.shape)
            assert torch.equal(state[key], want), (name, key)
            for dim, idx in m.index.items():  # the new entries start at zero
                assert not state[key].index_select(dim, (idx < 0).nonzero().flatten()).any(), (name, key)
        assert float(state["step"]) == 2
    assert any(mapping[n].source is None for n, _ in named) and any(
        bool((i < 0).any()) for n, _ in named for i in mapping[n].index.values())
    # the grown model trains with it
    train(grown, remapped, [x])
    for name, t in before.items():
        assert torch.equal(model.state_dict()[name], t)


def test_named_state_dict_goes_back_onto_a_rebuilt_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    optimizer = torch.optim.Adam([{"params": model[2].parameters(), "lr": 1e-2}, {"params": model[0].parameters()}],
                                 lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    saved = fxprune.optim.named_state_dict(optimizer, model)
    assert saved["names"] == [["2.weight", "2.bias"], ["0.weight", "0.bias"]]
    rebuilt = copy.deepcopy(model)
    new = fxprune.optim.load_named_state_dict(optimizer, rebuilt, saved)
    assert [g["lr"] for g in new.param_groups] == [1e-2, 1e-3]
    for (name, p), q in zip(model.named_parameters(), rebuilt.parameters()):
        assert all(torch.equal(optimizer.state[p][k], new.state[q][k]) for k in ("exp_avg", "exp_avg_sq")), name
    wider = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(fxprune.FxpruneError, match=r"exp_avg.* of parameter '2.weight' has another shape"):
        fxprune.optim.load_named_state_dict(optimizer, wider, saved)
    with pytest.raises(fxprune.FxpruneError, match=r"trains parameter\(s\) \['2.weight', '2.bias'\] that the model"):
        fxprune.optim.load_named_state_dict(optimizer, nn.Sequential(nn.Linear(4, 3)), saved)
