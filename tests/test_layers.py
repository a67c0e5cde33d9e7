"""Removable layers (fxprune/layers.py, passes/remove_layers.py): residual branches y = x + F(x).

Covers the layers found in torchvision models and transformer layers (names, groups), removal
(compact equals apply_masks, the branch's parameters are gone, the cost drops, the user's model is
untouched, the remaining layers keep their names), a group emptied inside a layer collapsing into
the removal of that layer, bad layer masks, training after removal, and in-place operations next
to a removed branch.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from test_properties import assert_outputs_close, out

zoo = pytest.importorskip("fxprune.zoo")
try:
    TV = zoo.torchvision_models()
except ImportError as e:  # pragma: no cover - depends on the environment
    pytest.skip(f"torchvision is not installed: {e}", allow_module_level=True)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

class WrappedEncoder(nn.Module):
    """Two post-norm nn.TransformerEncoderLayer's: four branches (attention, feed-forward each)."""

    def __init__(self, norm_first: bool = False):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(self.inp(x)))


class WrappedDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.dec = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x, memory):
        return self.head(self.dec(x, memory))


def tiny_vit() -> nn.Module:
    return TV.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                                num_classes=10)


def torchvision(name: str, **kw):
    return lambda: getattr(TV, name)(num_classes=10, **kw)


def image(size: int):
    return lambda: torch.randn(1, 3, size, size)


SWIN = ["features.1.0:norm1", "features.1.0:norm2", "features.1.1:norm1"]
VIT = [f"encoder.layers.encoder_layer_{i}:{b}" for i in range(2) for b in ("ln_1", "ln_2")]
ENCODER = [f"enc.layers.{i}:{b}" for i in range(2) for b in ("self_attn", "linear1")]

# name -> (model factory, inputs factory, number of layers, the first layer names)
MODELS = {
    "resnet18": (torchvision("resnet18"), image(32), 5, ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]),
    "resnet50": (torchvision("resnet50"), image(32), 12, ["layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer2.3"]),
    "mobilenet_v2": (torchvision("mobilenet_v2"), image(32), 10, ["features.3", "features.5", "features.6"]),
    "convnext_tiny": (torchvision("convnext_tiny"), image(32), 18, ["features.1.0", "features.1.1", "features.1.2"]),
    "efficientnet_b0": (torchvision("efficientnet_b0"), image(32), 9, ["features.2.1", "features.3.1", "features.4.1"]),
    "swin_t": (torchvision("swin_t"), image(64), 24, SWIN),
    "vit_tiny": (tiny_vit, image(32), 4, VIT),
    "encoder": (WrappedEncoder, lambda: torch.randn(6, 2, 5), 4, ENCODER),
    "decoder": (WrappedDecoder, lambda: (torch.randn(6, 2, 8), torch.randn(4, 2, 8)), 3,
                ["dec:self_attn", "dec:multihead_attn", "dec:linear1"]),
}
ALL = list(MODELS)

_CACHE: dict[str, tuple] = {}


def case(name: str) -> tuple[nn.Module, tuple, fxprune.Analysis]:
    """(model in eval mode with non-trivial constants, example inputs as a tuple, analysis), built once."""
    if name not in _CACHE:
        make, inputs, *_ = MODELS[name]
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = zoo.randomize_constants(make()).eval()
        x = inputs()
        x = x if isinstance(x, tuple) else (x,)
        _CACHE[name] = (model, x, fxprune.analyze(model, x))
    return _CACHE[name]


def run(model, x: tuple) -> torch.Tensor:
    with torch.no_grad():
        return model(*(t.clone() for t in x))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} of the user's model changed"


def branch_parameters(analysis: fxprune.Analysis, layer: fxprune.Layer) -> set[str]:
    """The qualified names of the parameters the nodes of ``layer`` use."""
    nodes = {n.name: n for n in analysis.gm.graph.nodes}
    names = set()
    for node_name in layer.nodes:
        n = nodes[node_name]
        if n.op == "call_module":
            names |= {f"{n.target}.{p}" for p, _ in analysis.gm.get_submodule(n.target).named_parameters()}
        elif n.op == "get_attr" and isinstance(getattr(analysis.gm.get_submodule(n.target.rpartition(".")[0]),
                                                       n.target.rpartition(".")[2]), nn.Parameter):
            names.add(n.target)
    return names


def compact(model, masks, x, analysis=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxprune.compact(model, masks, x, analysis, **kw)


# --------------------------------------------------------------------------------------------
# 1. the layers found
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_layers_found(name):
    _, _, analysis = case(name)
    count, first = MODELS[name][2], MODELS[name][3]
    names = [layer.name for layer in analysis.layers]
    assert len(names) == count, names
    assert names[:len(first)] == first
    assert len(set(names)) == len(names)
    for layer in analysis.layers:
        assert analysis.layer(layer.name) is layer
        assert layer.nodes and layer.branch_out in layer.nodes and layer.add not in layer.nodes
        assert branch_parameters(analysis, layer), f"{layer.name} holds no parameter"
        groups = {g.name for g in analysis.groups}
        assert set(layer.groups) <= groups


@pytest.mark.slow
def test_vit_b_16_layers():
    """torchvision's ViT-B/16 at 224 x 224: an attention and an MLP branch in each of 12 layers."""
    torch.manual_seed(0)
    model = zoo.randomize_constants(TV.vit_b_16(num_classes=10)).eval()
    x = torch.randn(1, 3, 224, 224)
    analysis = fxprune.analyze(model, x)
    assert [layer.name for layer in analysis.layers] == [f"encoder.layers.encoder_layer_{i}:{b}" for i in range(12)
                                                         for b in ("ln_1", "ln_2")]
    masks = {layer.name: False for layer in analysis.layers[::2]}
    small = compact(model, masks, x, analysis)
    reference = fxprune.apply_masks(model, masks, x, analysis)
    assert_outputs_close(out(small, x), out(reference, x), "compact vs apply_masks")
    assert not any(".self_attention." in n for n, _ in small.named_parameters())


def test_layer_contents_resnet18():
    _, _, analysis = case("resnet18")
    layer = analysis.layer("layer1.1")
    assert layer.modules == ["layer1.1.conv1", "layer1.1.bn1", "layer1.1.relu", "layer1.1.conv2", "layer1.1.bn2"]
    assert layer.groups == ["layer1.1.conv1"]
    # a block with a downsample shortcut is no layer
    assert "layer2.0" not in {x.name for x in analysis.layers}
    with pytest.raises(KeyError):
        analysis.layer("layer2.0")


def test_layer_groups_resnet50():
    _, _, analysis = case("resnet50")
    assert analysis.layer("layer1.1").groups == ["layer1.1.conv1", "layer1.1.conv2"]
    assert analysis.layer("layer1.1").modules[-1] == "layer1.1.bn3"


def test_transformer_layer_groups():
    _, _, analysis = case("encoder")
    assert [layer.groups for layer in analysis.layers] == [[f"enc.layers.{i}.{g}"] for i in range(2)
                                                           for g in ("self_attn.heads", "linear1")]
    _, _, analysis = case("decoder")
    assert [layer.groups for layer in analysis.layers] == [["dec.self_attn.heads"], ["dec.multihead_attn.heads"],
                                                           ["dec.linear1"]]


def test_pre_norm_transformer_layers_are_named_after_their_first_module():
    torch.manual_seed(0)
    model, x = WrappedEncoder(norm_first=True).eval(), torch.randn(6, 2, 5)
    names = [layer.name for layer in fxprune.analyze(model, x).layers]
    assert names == [f"enc.layers.{i}:{b}" for i in range(2) for b in ("norm1", "norm2")]


# --------------------------------------------------------------------------------------------
# 2. removal
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_remove_every_other_layer(name):
    model, x, analysis = case(name)
    before, expected = snapshot(model), run(model, x)
    removed = analysis.layers[::2]
    masks = {layer.name: False for layer in removed}
    reference = fxprune.apply_masks(model, masks, x, analysis).eval()
    small = compact(model, masks, x, analysis).eval()
    assert_outputs_close(run(small, x), run(reference, x), f"{name}: compact vs apply_masks")
    left = {n for n, _ in small.named_parameters()}
    for layer in removed:
        gone = branch_parameters(analysis, layer)
        assert gone and not (gone & left), f"{name}: parameters of {layer.name} remain: {sorted(gone & left)[:3]}"
        if ":" not in layer.name:  # the block holds nothing else
            assert not any(n.startswith(layer.name + ".") for n in left)
    for layer in analysis.layers[1::2]:
        assert branch_parameters(analysis, layer) <= left
    c0, c1 = fxprune.cost(model, x), fxprune.cost(small, x)
    assert c1.params < c0.params and c1.flops < c0.flops
    assert c0.params - c1.params == sum(p.numel() for n, p in model.named_parameters()
                                        if any(n in branch_parameters(analysis, layer) for layer in removed))
    assert_unchanged(model, before)
    assert torch.equal(run(model, x), expected)


@pytest.mark.parametrize("name", ALL)
def test_remaining_layers_keep_their_names(name):
    """Regression: a name depended on how many branches its block held ('<block>:<first module>'
    for several, '<block>' for one), so removing one branch of a transformer layer renamed the other."""
    model, x, analysis = case(name)
    masks = {layer.name: False for layer in analysis.layers[::2]}
    small = compact(model, masks, x, analysis)
    remaining = [layer.name for layer in analysis.layers[1::2]]
    assert [layer.name for layer in fxprune.analyze(small, x).layers] == remaining


def test_remove_every_layer_resnet18():
    model, x, analysis = case("resnet18")
    masks = {layer.name: False for layer in analysis.layers}
    small = compact(model, masks, x, analysis)
    reference = fxprune.apply_masks(model, masks, x, analysis)
    assert_outputs_close(run(small, x), run(reference, x), "compact vs apply_masks")
    assert fxprune.analyze(small, x).layers == []


@pytest.mark.parametrize("flag", [True, torch.tensor([True]), torch.tensor(True)],
                         ids=["True", "tensor([True])", "tensor(True)"])
def test_a_true_layer_mask_keeps_the_layer(flag):
    model, x, analysis = case("resnet18")
    small = compact(model, {"layer1.1": flag}, x, analysis)
    assert {n for n, _ in small.named_parameters()} == {n for n, _ in model.named_parameters()}
    assert_outputs_close(run(small, x), run(model, x), "compact(keep) vs model")


@pytest.mark.parametrize("flag", [False, torch.tensor([False]), torch.tensor(False)],
                         ids=["False", "tensor([False])", "tensor(False)"])
def test_a_false_layer_mask_removes_the_layer(flag):
    model, x, analysis = case("resnet18")
    small = compact(model, {"layer1.1": flag}, x, analysis)
    assert not any(n.startswith("layer1.1.") for n, _ in small.named_parameters())
    masked = fxprune.apply_masks(model, {"layer1.1": flag}, x, analysis)
    assert_outputs_close(run(small, x), run(masked, x), "compact vs apply_masks")
    assert not torch.allclose(run(masked, x), run(model, x)), "removing a layer changed nothing"


def test_removal_with_channel_masks_resnet18():
    model, x, analysis = case("resnet18")
    g = torch.Generator().manual_seed(1)
    masks = {grp.name: torch.rand(grp.size, generator=g) > 0.4 for grp in analysis.groups if grp.prunable}
    masks.update({"layer1.0": False, "layer3.1": False})
    small = compact(model, masks, x, analysis)
    reference = fxprune.apply_masks(model, masks, x, analysis)
    assert_outputs_close(run(small, x), run(reference, x), "compact vs apply_masks")
    assert "layer3.1.conv1.weight" not in dict(small.named_parameters())
    # a channel mask of a removed layer's group is ignored
    assert "layer1.0.conv1.weight" not in dict(small.named_parameters())


# --------------------------------------------------------------------------------------------
# 3. a group emptied inside a layer removes the layer
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, group, layer", [
    ("resnet18", "layer1.1.conv1", "layer1.1"),
    ("resnet18", "layer4.1.conv1", "layer4.1"),
    ("mobilenet_v2", "features.5.conv.0.0", "features.5"),
    ("encoder", "enc.layers.0.linear1", "enc.layers.0:linear1"),
    ("encoder", "enc.layers.1.self_attn.heads", "enc.layers.1:self_attn"),
    ("decoder", "dec.multihead_attn.heads", "dec:multihead_attn"),
])
def test_emptied_group_inside_a_layer_removes_it(name, group, layer):
    model, x, analysis = case(name)
    g = analysis.group(group)
    assert group in analysis.layer(layer).groups
    emptied = compact(model, {group: torch.zeros(g.size, dtype=torch.bool)}, x, analysis)
    removed = compact(model, {layer: False}, x, analysis)
    assert {n: p.shape for n, p in emptied.named_parameters()} == {n: p.shape for n, p in removed.named_parameters()}
    assert_outputs_close(run(emptied, x), run(removed, x), "emptied group vs removed layer")
    reference = fxprune.apply_masks(model, {group: torch.zeros(g.size, dtype=torch.bool)}, x, analysis)
    assert_outputs_close(run(emptied, x), run(reference, x), "emptied group: compact vs apply_masks")


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 4, 1)

    def forward(self, y):
        return y + self.b(torch.tanh(self.a(y)))


class Outer(nn.Module):
    """x + conv2(inner(conv1(x))), inner itself a residual block: two nested layers."""

    def __init__(self):
        super().__init__()
        self.conv1, self.inner, self.conv2 = nn.Conv2d(4, 4, 1), Inner(), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return x + self.conv2(torch.tanh(self.inner(self.conv1(x))))


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.outer, self.head = nn.Conv2d(3, 4, 1), Outer(), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.outer(self.stem(x)))


def test_emptied_group_removes_the_innermost_layer():
    torch.manual_seed(0)
    model, x = Nested().eval(), torch.randn(2, 3, 5, 5)
    analysis = fxprune.analyze(model, x)
    assert [layer.name for layer in analysis.layers] == ["outer.inner", "outer"]
    assert "outer.inner.a" in analysis.layer("outer.inner").groups and "outer.inner.a" in analysis.layer("outer").groups
    emptied = compact(model, {"outer.inner.a": torch.zeros(6, dtype=torch.bool)}, x, analysis)
    removed = compact(model, {"outer.inner": False}, x, analysis)
    names = {n for n, _ in emptied.named_parameters()}
    assert names == {n for n, _ in removed.named_parameters()}
    assert "outer.conv1.weight" in names and "outer.inner.a.weight" not in names
    assert_outputs_close(run(emptied, (x,)), run(removed, (x,)), "emptied group vs removed inner layer")
    # removing the outer layer takes the inner one with it
    both = compact(model, {"outer": False, "outer.inner": False}, x, analysis)
    assert {n for n, _ in both.named_parameters()} == {"stem.weight", "stem.bias", "head.weight", "head.bias"}
    assert_outputs_close(run(both, (x,)), run(fxprune.apply_masks(model, {"outer": False}, x, analysis), (x,)),
                         "outer removed")


def test_emptied_group_outside_any_layer_is_a_mask_error():
    model, x, analysis = case("resnet18")
    for fn in (fxprune.apply_masks, fxprune.compact):
        with pytest.raises(fxprune.MaskError, match="'conv1'.*no removable layer"):
            fn(model, {"conv1": torch.zeros(64, dtype=torch.bool)}, x, analysis)
    with pytest.raises(fxprune.MaskError, match="'layer2.0.conv1'"):  # the block has a downsample: no layer
        fxprune.compact(model, {"layer2.0.conv1": torch.zeros(128, dtype=torch.bool)}, x, analysis)


@pytest.mark.parametrize("value", [
    torch.tensor([0.0]), torch.tensor([False, False, True]), torch.tensor([1]), 0, 1.0, "no", None,
], ids=["float-tensor", "3-element", "int-tensor", "int", "float", "str", "None"])
def test_bad_layer_mask_is_a_mask_error(value):
    model, x, analysis = case("resnet18")
    for fn in (fxprune.apply_masks, fxprune.compact):
        with pytest.raises(fxprune.MaskError, match="'layer1.1'"):
            fn(model, {"layer1.1": value}, x, analysis)


# --------------------------------------------------------------------------------------------
# 4. training after removal
# --------------------------------------------------------------------------------------------

def test_compact_model_trains_after_removal_resnet18():
    model, _, _ = case("resnet18")
    x2 = torch.randn(2, 3, 32, 32)
    masks = {"layer1.0": False, "layer2.1": False, "layer4.1": False}
    small = compact(model, masks, x2).train()  # train mode: batch statistics need two samples
    loss = small(x2).square().mean()
    loss.backward()  # the in-place ReLU after a removed add no longer writes into the shared skip
    for n, p in small.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert any(bool(p.grad.any()) for p in small.parameters())
    assert not model.training


def test_gradients_after_removal_equal_the_masked_reference():
    """Eval mode: the compact model's gradients are the reference's, restricted by the mapping."""
    model, x, analysis = case("resnet18")
    masks = {"layer1.1": False, "layer3.1": False, "layer2.0.conv1": torch.arange(128) % 3 != 0}
    reference = fxprune.apply_masks(model, masks, x, analysis).eval()
    small, mapping = compact(model, masks, x, analysis, return_mapping=True)
    small.eval()
    reference(x[0]).square().mean().backward()
    small(x[0]).square().mean().backward()
    ref = dict(reference.named_parameters())
    for n, p in small.named_parameters():
        want = mapping[n].carry(ref[mapping[n].source].grad, p.shape)
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-4 * float(want.abs().max().clamp(min=1e-6)))


def test_transformer_trains_after_removal():
    model, x, analysis = case("encoder")
    small = compact(model, {"enc.layers.0:self_attn": False, "enc.layers.1:linear1": False}, x, analysis).train()
    small(*x).square().mean().backward()
    assert all(p.grad is not None for p in small.parameters())


# --------------------------------------------------------------------------------------------
# 5. in-place operations next to a removed branch
# --------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return x + self.conv(x)


class AfterAdd(nn.Module):
    """A block, then an in-place op on its output; the block's input is used again afterwards."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.stem, self.block, self.head = nn.Conv2d(3, 4, 1), Block(), nn.Conv2d(4, 2, 1)
        self.other = nn.Conv2d(4, 4, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.stem(x)
        y = self.block(h)
        if self.how == "module":
            z = self.act(y)
        elif self.how == "method":
            z = y.relu_()
        elif self.how == "iadd":
            y += 1.0
            z = y
        elif self.how == "torch.relu_":
            z = torch.relu_(y)
        else:  # "F.relu(inplace=True)"
            z = F.relu(y, inplace=True)
        return self.head(z + self.other(h))


@pytest.mark.parametrize("how", ["module", "method", "iadd", "torch.relu_", "F.relu(inplace=True)"])
def test_in_place_op_after_a_removed_add(how):
    """The skip input is used again after the block: an in-place op on the removed add's output
    must not write into it. (Regression: torch.relu_ was left in place and changed h;
    F.relu(inplace=True) made remove_layers edit the user's kwargs while iterating over the add's
    users: RuntimeError 'dictionary keys changed during iteration'.)"""
    torch.manual_seed(0)
    model, x = AfterAdd(how).eval(), torch.randn(1, 3, 4, 4)
    masks = {"block": False}
    reference = fxprune.apply_masks(model, masks, x)
    small = compact(model, masks, x)
    assert_outputs_close(out(small, x), out(reference, x), f"{how}: compact vs apply_masks")


class ReadAfterInPlace(nn.Module):
    """y + act(y) with an in-place act: the add reads y after act changed it (2 * relu(y))."""

    def __init__(self):
        super().__init__()
        self.stem, self.block, self.head = nn.Conv2d(3, 4, 1), Block(), nn.Conv2d(4, 2, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.block(self.stem(x))
        return self.head(y + self.act(y))


def test_in_place_op_after_a_removed_add_whose_effect_is_read():
    """Regression: remove_layers made the in-place ReLU after the removed add out of place, so the
    second use of y no longer saw its effect: compact computed y + relu(y), apply_masks (and the
    model) 2 * relu(y)."""
    torch.manual_seed(0)
    model, x = ReadAfterInPlace().eval(), torch.randn(1, 3, 4, 4)
    masks = {"block": False}
    small = compact(model, masks, x)
    assert_outputs_close(out(small, x), out(fxprune.apply_masks(model, masks, x), x), "compact vs apply_masks")


class PreAct(nn.Module):
    """x + conv(relu_(x)): the branch's in-place ReLU also changes the skip input."""

    def __init__(self):
        super().__init__()
        self.act, self.conv = nn.ReLU(inplace=True), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(self.act(x)) + x


class PreActNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.head = nn.Conv2d(3, 4, 1), PreAct(), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def test_removing_a_branch_that_changes_its_skip_in_place():
    """The branch's first op is an in-place ReLU on the skip input, so the model (and apply_masks)
    compute relu(x) + 0 * F. (Regression: compact removed the ReLU with the branch and computed x.)
    Such a branch is either no removable layer or its in-place op stays."""
    torch.manual_seed(0)
    model, x = PreActNet().eval(), torch.randn(1, 3, 4, 4)
    analysis = fxprune.analyze(model, x)
    if "block" not in {layer.name for layer in analysis.layers}:
        return  # not offered as a removable layer: fine
    masks = {"block": False}
    small = compact(model, masks, x, analysis)
    reference = fxprune.apply_masks(model, masks, x, analysis)
    assert_outputs_close(out(small, x), out(reference, x), "compact vs apply_masks")


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
        self.blocks = nn.Sequential(Block(), Block(), Block())

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


@pytest.mark.parametrize("order", [
    ("blocks.0", "blocks.1", "blocks.2"), ("blocks.2", "blocks.1", "blocks.0"), ("blocks.1", "blocks.2", "blocks.0"),
    ("blocks.1", "blocks.0", "blocks.2"),
], ids=lambda o: "-".join(n[-1] for n in o))
def test_removing_chained_layers_in_any_order(order):
    """Each block's skip input is the previous block's add; the masks name them in any order.
    (Regression: in the order 1, 0, 2, blocks.2's add was replaced by blocks.0's erased add:
    RuntimeError "Argument 'add' of Node 'head' was used before it has been defined".)"""
    torch.manual_seed(0)
    model, x = Chain().eval(), torch.randn(1, 3, 4, 4)
    masks = {name: False for name in order}
    small = compact(model, masks, x)
    assert_outputs_close(out(small, x), out(fxprune.apply_masks(model, masks, x), x), "compact vs apply_masks")
    assert {n for n, _ in small.named_parameters()} == {"stem.weight", "stem.bias", "head.weight", "head.bias"}


class IdentityBefore(nn.Module):
    """An nn.Identity produces the skip input, which the branch reads too."""

    def __init__(self):
        super().__init__()
        self.stem, self.act, self.head = nn.Conv2d(3, 4, 1), nn.Identity(), nn.Conv2d(4, 2, 1)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.act(self.stem(x))
        return self.head(h + self.conv(h))


class IdentityShortcut(nn.Module):
    """x + F(x) written as self.shortcut(x) + F(x) with an nn.Identity shortcut."""

    def __init__(self):
        super().__init__()
        self.stem, self.shortcut, self.head = nn.Conv2d(3, 4, 1), nn.Identity(), nn.Conv2d(4, 2, 1)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.stem(x)
        return self.head(self.shortcut(h) + self.conv(h))


@pytest.mark.parametrize("make", [IdentityBefore, IdentityShortcut])
def test_identity_next_to_the_skip(make):
    """Regression: looking through an nn.Identity shortcut also took an nn.Identity that produces
    the skip into the branch, so compact erased it: RuntimeError "Tried to erase Node act but it
    still had 1 users in the graph"."""
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(1, 3, 4, 4)
    analysis = fxprune.analyze(model, x)
    assert len(analysis.layers) == 1
    layer = analysis.layers[0]
    assert [n for n in layer.nodes if n in ("act", "shortcut")] == []
    masks = {layer.name: False}
    small = compact(model, masks, x, analysis)
    reference = fxprune.apply_masks(model, masks, x, analysis)
    assert_outputs_close(out(small, x), out(reference, x), "compact vs apply_masks")
    assert {n for n, _ in small.named_parameters()} == {"stem.weight", "stem.bias", "head.weight", "head.bias"}
