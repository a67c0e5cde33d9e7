"""compact(round_to=...): channel counts at multiples of round_to, the same function."""
import pytest
import torch
from torch import nn

import fxprune
from fxprune.zoo import torchvision_models


def random_masks(analysis, keep: float, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {g.name: torch.rand(g.size, generator=gen) < keep for g in analysis.groups if g.prunable}


@pytest.mark.parametrize("round_to", [8, 32])
def test_resnet_channel_counts_are_multiples_and_exact(round_to):
    model, x = torchvision_models().resnet18(num_classes=10).eval(), torch.randn(2, 3, 32, 32)
    analysis = fxprune.analyze(model, x)
    masks = random_masks(analysis, 0.45)
    small = fxprune.compact(model, masks, x, analysis, round_to=round_to).eval()
    for g in analysis.groups:
        if g.name in masks and not bool(masks[g.name].all()):
            conv = small.get_submodule(g.producers[0])
            assert conv.out_channels % round_to == 0 or conv.out_channels == g.size, g.name
            assert conv.out_channels >= int(masks[g.name].sum())
    reference = fxprune.apply_masks(model, masks, x, analysis).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), reference(x), rtol=1e-5, atol=1e-5)
    plain = fxprune.compact(model, masks, x, analysis)
    assert fxprune.cost(small, x).params > fxprune.cost(plain, x).params


def test_extra_channels_follow_scores():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    x = torch.randn(1, 3, 4, 4)
    mask = torch.zeros(16, dtype=torch.bool)
    mask[:3] = True
    scores = torch.arange(16.0)  # the highest scores: the last channels
    small, mapping = fxprune.compact(model, {"0": mask}, x, round_to=8, scores={"0": scores}, return_mapping=True)
    assert small.get_submodule("0").out_channels == 8
    assert mapping["0.weight"].index[0].tolist() == [0, 1, 2, 11, 12, 13, 14, 15]
    first = fxprune.compact(model, {"0": mask}, x, round_to=8, return_mapping=True)[1]
    assert first["0.weight"].index[0].tolist() == list(range(8))
    with torch.no_grad():
        torch.testing.assert_close(small(x), fxprune.apply_masks(model, {"0": mask}, x)(x))


class LSTMHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(6, 20, batch_first=True), nn.Linear(20, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


def test_lstm_hidden_units_are_rounded():
    model, x = LSTMHead().eval(), torch.randn(2, 5, 6)
    keep = torch.zeros(20, dtype=torch.bool)
    keep[:5] = True
    small = fxprune.compact(model, {"lstm.hidden_l0": keep}, x, round_to=8)
    assert small.lstm.module.hidden_size == 8  # wrapped: its 3 extra units stay zeroed
    with torch.no_grad():
        torch.testing.assert_close(small(x), fxprune.apply_masks(model, {"lstm.hidden_l0": keep}, x)(x))


def test_wrong_scores_shape_names_the_group():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 4, 1))
    mask = torch.ones(16, dtype=torch.bool)
    mask[0] = False
    with pytest.raises(fxprune.MaskError, match=r"scores\['0'\]"):
        fxprune.compact(model, {"0": mask}, torch.randn(1, 3, 4, 4), round_to=8, scores={"0": torch.ones(3)})


def test_methods_round_their_channel_counts():
    """GrowEfficient and SingleShot pass round_to to compact, choosing extra units by gate or score."""
    from fxprune.methods import GrowEfficient, SingleShot

    model, x = torchvision_models().resnet18(num_classes=10).eval(), torch.randn(2, 3, 32, 32)
    ge = GrowEfficient(model, x, target=0.5, epochs=2, seed=0.3)
    small, _ = ge.compact(round_to=8)
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)
    ss = SingleShot(model, x)
    batch = (x, torch.tensor([1, 2]))
    masks = ss.masks(batch, torch.nn.functional.cross_entropy, target=0.5)
    small = ss.compact(masks, round_to=8, scores=ss.scores(batch, torch.nn.functional.cross_entropy))
    assert all(m.out_channels % 8 == 0 for m in small.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), ss.compact(masks).eval()(x), rtol=1e-5, atol=1e-5)


def two_convs(width: int = 40) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 4)).eval()


def conv_widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_methods_round_to_8_by_default_and_1_opts_out():
    """GrowEfficient.compact and SingleShot.compact round to multiples of 8 unless given round_to=1;
    the result is the same function either way."""
    from fxprune.methods import GrowEfficient, SingleShot

    model, x = two_convs(), torch.randn(2, 3, 8, 8)
    ge = GrowEfficient(model, x, target=0.5, epochs=2, seed=0.3)  # 12 of 40 units on per group
    (rounded, _), (plain, _) = ge.compact(), ge.compact(round_to=1)
    assert conv_widths(plain) == [12, 12] and conv_widths(rounded) == [16, 16]
    ss = SingleShot(model, x)
    masks = {g: torch.arange(40) < 13 for g in ("0", "3")}
    assert conv_widths(ss.compact(masks)) == [16, 16] and conv_widths(ss.compact(masks, round_to=1)) == [13, 13]
    with torch.no_grad():
        torch.testing.assert_close(rounded(x), plain(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ss.compact(masks)(x), ss.compact(masks, round_to=1)(x), rtol=1e-5, atol=1e-5)
    assert conv_widths(fxprune.compact(model, masks, x)) == [13, 13]  # the compiler primitive does not round


def test_grow_efficient_resizes_to_room_for_its_rounded_architecture():
    """A resize keeps the units on and the reserve, and with round_to as many as the rounded
    architecture that compact() returns needs: 9 of 30 units on, a reserve of 25%: 12, or 16."""
    from fxprune.methods import GrowEfficient

    model, x = two_convs(30), torch.randn(2, 3, 8, 8)
    widths = {}
    for round_to in (1, 8):
        ge = GrowEfficient(model, x, target=0.5, epochs=2, seed=0.3, round_to=round_to)
        ge.resize()
        widths[round_to] = conv_widths(ge.base)
    assert widths == {1: [12, 12], 8: [16, 16]}


@pytest.mark.parametrize("round_to", [0, -8, 2.5, True, "8"])
def test_round_to_must_be_a_positive_int(round_to):
    from fxprune.methods import GrowEfficient, SingleShot

    model, x = two_convs(8), torch.randn(1, 3, 4, 4)
    masks = {"0": torch.arange(8) < 3}
    calls = [lambda: fxprune.compact(model, masks, x, round_to=round_to),
             lambda: SingleShot(model, x).compact(masks, round_to=round_to),
             lambda: GrowEfficient(model, x, epochs=1).compact(round_to=round_to),
             lambda: GrowEfficient(model, x, epochs=1, round_to=round_to)]
    for call in calls:
        with pytest.raises(ValueError, match=f"round_to must be a positive int .*got {round_to!r}"):
            call()
