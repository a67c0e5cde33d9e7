"""Attention rules: heads of nn.MultiheadAttention as units, transformer layers, torchvision ViT (Swin and
MaxViT: tests/test_window_attention.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxprune
from fxprune.modules.attention import PrunedMultiheadAttention
from fxprune.zoo import randomize_constants


def keep(n: int, *drop: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[list(drop)] = False
    return mask


def assert_exact(model: nn.Module, masks: dict, *inputs: torch.Tensor, exact: bool = True) -> nn.Module:
    model.eval()
    ref = fxprune.apply_masks(model, masks, inputs).eval()
    small = fxprune.compact(model, masks, inputs, exact=exact).eval()
    with torch.no_grad():
        for args in (inputs, tuple(torch.randn_like(x) if x.is_floating_point() else x for x in inputs)):
            torch.testing.assert_close(small(*args), ref(*args), rtol=1e-5, atol=1e-5)
    return small


class SelfAttention(nn.Module):
    def __init__(self, embed: int = 12, heads: int = 4, **kwargs):
        super().__init__()
        self.inp = nn.Linear(5, embed)
        self.attn = nn.MultiheadAttention(embed, heads, **kwargs)
        self.head = nn.Linear(embed, 3)

    def forward(self, x):
        h = self.inp(x)
        out, _ = self.attn(h, h, h, need_weights=False)
        return self.head(out)


@pytest.mark.parametrize("kwargs", [
    {}, {"batch_first": True}, {"bias": False}, {"add_bias_kv": True}, {"add_zero_attn": True},
], ids=["default", "batch_first", "no-bias", "bias_kv", "zero_attn"])
def test_heads_are_units_and_removal_is_exact(kwargs):
    torch.manual_seed(0)
    model = SelfAttention(**kwargs)
    x = torch.randn(7, 2, 5)
    an = fxprune.analyze(model, x)
    heads = an.group("attn.heads")
    assert heads.size == 4 and heads.prunable
    small = assert_exact(model, {"attn.heads": keep(4, 1, 2)}, x)
    attn = small.get_submodule("attn")
    assert isinstance(attn, PrunedMultiheadAttention) and attn.num_heads == 2 and attn.head_dim == 3
    assert attn.in_proj_weight.shape == (3 * 2 * 3, 12) and attn.out_proj.weight.shape == (12, 6)
    rows = torch.cat([torch.arange(h * 3, h * 3 + 3) + part * 12 for part in range(3) for h in (0, 3)])
    torch.testing.assert_close(attn.in_proj_weight, model.attn.in_proj_weight[rows], rtol=0, atol=0)
    columns = torch.cat([torch.arange(0, 3), torch.arange(9, 12)])
    torch.testing.assert_close(attn.out_proj.weight, model.attn.out_proj.weight[:, columns], rtol=0, atol=0)


def test_input_features_of_q_k_v_are_coupled_and_follow_their_producer():
    torch.manual_seed(0)
    model = SelfAttention()
    x = torch.randn(7, 2, 5)
    an = fxprune.analyze(model, x)
    inp = an.group("inp")
    assert inp.prunable  # the embedding only feeds the projections: no LayerNorm here
    small = assert_exact(model, {"inp": keep(12, 0, 5), "attn.heads": keep(4, 3)}, x)
    assert small.get_submodule("attn").in_proj_weight.shape == (27, 10)


class CrossAttention(nn.Module):
    """Separate q/k/v projection weights (kdim, vdim differ from embed_dim)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(5, 8), nn.Linear(5, 6), nn.Linear(5, 7)
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=7, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x, memory):
        out, _ = self.attn(self.q(x), self.k(memory), self.v(memory), need_weights=False)
        return self.head(out)


def test_cross_attention_with_separate_projections():
    torch.manual_seed(0)
    model = CrossAttention()
    x, memory = torch.randn(2, 4, 5), torch.randn(2, 9, 5)
    an = fxprune.analyze(model, (x, memory))
    assert {g.name for g in an.groups if g.prunable} >= {"q", "k", "v", "attn.heads", "attn"}
    small = assert_exact(model, {"attn.heads": keep(2, 0), "k": keep(6, 2), "v": keep(7, 0, 6), "attn": keep(8, 3)},
                         x, memory)
    attn = small.get_submodule("attn")
    assert attn.k_proj_weight.shape == (4, 5) and attn.v_proj_weight.shape == (4, 5)
    assert attn.out_proj.weight.shape == (7, 4) and small.get_submodule("head").weight.shape == (3, 7)


class UsesWeights(nn.Module):
    def __init__(self, average: bool):
        super().__init__()
        self.average = average
        self.attn = nn.MultiheadAttention(8, 4, batch_first=True)

    def forward(self, x):
        out, weights = self.attn(x, x, x, average_attn_weights=self.average)
        return out, weights


def test_averaged_attention_weights_in_use_block_the_heads():
    an = fxprune.analyze(UsesWeights(average=True), torch.randn(2, 5, 8))
    assert not an.group("attn.heads").prunable
    assert "averaged over its heads" in an.group("attn.heads").reason


def test_per_head_attention_weights_follow_the_heads():
    model = UsesWeights(average=False)
    x = torch.randn(2, 5, 8)
    an = fxprune.analyze(model, x)
    assert "attn.heads" in {g.name for g in an.groups}
    labels = an.labels[next(n.name for n in an.gm.graph.nodes if n.op == "call_module")][1]
    assert labels.shape == (2, 4, 5, 5)


class Encoder(nn.Module):
    def __init__(self, decoder: bool = False, norm_first: bool = False):
        super().__init__()
        self.decoder = decoder
        self.embed = nn.Linear(5, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        if decoder:
            self.dec = nn.TransformerDecoderLayer(16, 2, 24, dropout=0.1, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.encoder(self.embed(x))
        if self.decoder:
            h = self.dec(h, h)
        return self.head(h)


@pytest.mark.parametrize("decoder", [False, True], ids=["encoder", "encoder-decoder"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_transformer_layers(decoder, norm_first):
    torch.manual_seed(0)
    model = Encoder(decoder, norm_first)
    x = torch.randn(2, 6, 5)
    an = fxprune.analyze(model, x)
    groups = {g.name: g for g in an.groups}
    for i in range(2):
        assert groups[f"encoder.layers.{i}.self_attn.heads"].prunable
        assert groups[f"encoder.layers.{i}.linear1"].prunable and groups[f"encoder.layers.{i}.linear1"].size == 32
    stream = groups["embed"]
    assert not stream.exact and not stream.blocked and "normalises over channels" in stream.reason
    masks = {"encoder.layers.0.self_attn.heads": keep(4, 0, 3), "encoder.layers.1.linear1": keep(32, *range(0, 32, 3))}
    if decoder:
        masks |= {"dec.self_attn.heads": keep(2, 1), "dec.multihead_attn.heads": keep(2, 0), "dec.linear1": keep(24, 5)}
    small = assert_exact(model, masks, x)
    assert small.get_submodule("encoder.layers.0.self_attn").num_heads == 2
    assert small.get_submodule("encoder.layers.1.linear1").out_features == 21


def test_residual_stream_is_pruned_only_when_asked_and_reports_its_deviation():
    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(2, 6, 5)
    with pytest.raises(fxprune.MaskError, match="exact=False"):
        fxprune.compact(model, {"embed": keep(16, 0)}, x)
    with pytest.warns(UserWarning, match="largest deviation"):
        small = fxprune.compact(model, {"embed": keep(16, 0, 7)}, x, exact=False)
    assert small.get_submodule("encoder.layers.0.norm1").normalized_shape == (14,)
    assert small.get_submodule("encoder.layers.1.self_attn").in_proj_weight.shape == (48, 14)
    assert 0 < small.meta["fxprune_deviation"] < 10
    assert small(x).shape == (2, 6, 3)


def test_compacting_a_compacted_attention_again_is_exact():
    torch.manual_seed(0)
    model = SelfAttention()
    x = torch.randn(7, 2, 5)
    once = fxprune.compact(model.eval(), {"attn.heads": keep(4, 1)}, x)
    twice = assert_exact(once, {"attn.heads": keep(3, 0)}, x)
    assert twice.get_submodule("attn").num_heads == 2


@pytest.fixture(scope="module")
def tv():
    from fxprune.zoo import torchvision_models
    return torchvision_models()


def test_vit_heads_and_mlp_are_prunable_and_the_stream_is_inexact(tv):
    model = randomize_constants(tv.vit_b_16()).eval()  # its classifier starts at zero
    x = torch.randn(1, 3, 224, 224)
    an = fxprune.analyze(model, x)
    heads = [g for g in an.groups if g.name.endswith(".heads")]
    assert len(heads) == 12 and all(g.prunable and g.size == 12 for g in heads)
    mlp = [g for g in an.groups if g.name.endswith("mlp.0")]
    assert len(mlp) == 12 and all(g.prunable and g.size == 3072 for g in mlp)
    stream = an.group("conv_proj")
    assert not stream.exact and not stream.blocked
    masks = {heads[0].name: keep(12, *range(6)), mlp[-1].name: keep(3072, *range(0, 3072, 2))}
    small = fxprune.compact(model, masks, x, analysis=an)
    with torch.no_grad():
        torch.testing.assert_close(small(x), fxprune.apply_masks(model, masks, x, analysis=an)(x), rtol=1e-4, atol=1e-4)

