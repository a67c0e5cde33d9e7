"""fuse_for_inference (passes/fuse_for_inference.py): BatchNorm folding and dropout removal.

Every case compares the fused GraphModule with the model in eval mode, counts the BatchNorm and
dropout modules left, and checks that the input GraphModule is unchanged.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.passes.fuse_for_inference import fuse_for_inference
from fxprune.zoo import randomize_constants, torchvision_models


def n_batchnorms(m: nn.Module) -> int:
    return sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


def n_dropouts(gm: torch.fx.GraphModule) -> int:
    modules = sum(isinstance(x, nn.modules.dropout._DropoutNd) for x in gm.modules())
    calls = sum(n.op == "call_function" and "dropout" in n.target.__name__ for n in gm.graph.nodes)
    return modules + calls


def assert_close(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    assert (out - ref).abs().max() <= rel * ref.abs().max()


def fuse_checked(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """fuse_for_inference(gm), asserting that gm keeps its parameters, buffers, code and modes."""
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    code, modes = gm.code, [m.training for m in gm.modules()]
    fused = fuse_for_inference(gm)
    assert fused is not gm
    assert gm.code == code and [m.training for m in gm.modules()] == modes
    assert gm.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())
    assert not any(m.training for m in fused.modules())
    return fused


class TwoNorms(nn.Module):
    """One convolution read by two BatchNorms: neither may fold."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn1(y) + self.bn2(y)


class SharedConv(nn.Module):
    """A convolution called twice, once before a BatchNorm: folding would change the second call."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(self.conv(x)))


class Dropouts(nn.Module):
    """Every kind of dropout, between a convolution and its BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)
        self.drops = nn.Sequential(nn.Dropout(0.5), nn.Dropout2d(0.5), nn.AlphaDropout(0.5), nn.FeatureAlphaDropout(0.5))

    def forward(self, x):
        y = F.dropout(self.drops(self.conv(x)), 0.5, training=True)
        y = self.bn(torch.dropout(y, 0.5, True))
        return self.head(F.dropout(y.mean((2, 3)), p=0.3, training=self.training))

    def without_dropout(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


CASES = {  # id -> (model, input shape, BatchNorms left)
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU()), (2, 3, 8), 0),
    "conv2d_no_bias": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)), (2, 3, 6, 6), 0),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4)), (2, 3, 4, 5, 5), 0),
    "conv_transpose": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2), nn.BatchNorm2d(4)), (2, 3, 5, 5), 0),
    "linear": (lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU()), (4, 6), 0),
    "linear_no_bias": (lambda: nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5)), (4, 6), 0),
    # BatchNorm1d normalises dim 1 of (N, 5, 5): positions, not the Linear's features
    "linear_on_sequence": (lambda: nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)), (2, 5, 4), 1),
    "grouped_conv_transpose": (lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)), (2, 4, 5, 5), 1),
    "batch_statistics": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)), (2, 3, 6, 6), 1),
    "conv_feeds_two_norms": (TwoNorms, (2, 3, 6, 6), 2),
    "shared_conv": (SharedConv, (2, 4, 6, 6), 1),
    "norm_after_relu": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)), (2, 3, 6, 6), 1),
}


@pytest.mark.parametrize("make, shape, left", CASES.values(), ids=CASES.keys())
def test_fold(make, shape, left):
    torch.manual_seed(0)
    model = randomize_constants(make()).eval()
    x = torch.randn(shape)
    fused = fuse_checked(fxprune.trace(model, x))
    assert n_batchnorms(fused) == left
    with torch.no_grad():
        assert_close(fused(x), model(x))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vgg11_bn"])
def test_torchvision(name):
    torch.manual_seed(0)
    model = randomize_constants(getattr(torchvision_models(), name)(num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    gm = fxprune.trace(model, x)  # traced in training mode: the result is in eval mode anyway
    fused = fuse_checked(gm)
    assert n_batchnorms(model) > 0 and n_batchnorms(fused) == 0 and n_dropouts(fused) == 0
    assert len(list(fused.parameters())) < len(list(gm.parameters()))  # unused modules are deleted
    with torch.no_grad():
        assert_close(fused(x), model.eval()(x))


def test_dropout_removed():
    torch.manual_seed(0)
    model = randomize_constants(Dropouts())
    x = torch.randn(2, 3, 6, 6)
    gm = fxprune.trace(model, x)
    assert n_dropouts(gm) == 7
    fused = fuse_checked(gm)
    assert n_dropouts(fused) == 0 and n_batchnorms(fused) == 0
    with torch.no_grad():
        assert_close(fused(x), model.eval().without_dropout(x))


def every_other(analysis: fxprune.Analysis) -> dict[str, torch.Tensor]:
    return {g.name: torch.arange(g.size) % 2 == 0 for g in analysis.groups if g.prunable}


def test_compacted_and_masked_resnet18():
    """compact's result, and apply_masks's, whose channel masks multiply BatchNorm outputs."""
    torch.manual_seed(0)
    model = randomize_constants(torchvision_models().resnet18(num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    masks = every_other(fxprune.analyze(model, x))
    for gm in fxprune.compact(model, masks, x), fxprune.apply_masks(model, masks, x):
        fused = fuse_checked(gm)
        assert n_batchnorms(gm) > 0 and n_batchnorms(fused) == 0
        with torch.no_grad():
            assert_close(fused(x), gm(x))
    assert any(n.target is torch.mul for n in fused.graph.nodes)


def test_masked_modules_are_baked_and_export(tmp_path):
    """Units zeroed inside an LSTM (kept by round_to, or by apply_masks) run without
    functional_call after fusion, with the same outputs, and export to ONNX."""
    from fxprune.export import to_onnx
    from fxprune.modules.masked import MaskedModule
    from test_round_to import LSTMHead

    model, x = LSTMHead().eval(), torch.randn(2, 5, 6)
    keep = torch.zeros(20, dtype=torch.bool)
    keep[:5] = True
    for gm in (fxprune.compact(model, {"lstm.hidden_l0": keep}, x, round_to=8),
               fxprune.apply_masks(model, {"lstm.hidden_l0": keep}, x)):
        fused = fuse_for_inference(gm)
        wrapped = [m for m in fused.modules() if isinstance(m, MaskedModule)]
        assert wrapped and all(not m.masked_names for m in wrapped)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), gm.eval()(x), rtol=1e-5, atol=1e-6)
        to_onnx(gm, x, tmp_path / "masked.onnx")
