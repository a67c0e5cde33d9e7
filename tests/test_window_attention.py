"""Heads of attention written with tensor ops (torchvision's Swin, V1 and V2, and MaxViT; einsum and
matmul attention): each head is a unit, and removing heads is exact."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import fxprune
from fxprune.zoo import randomize_constants, torchvision_models

tv = torchvision_models()
swin = pytest.importorskip("torchvision.models.swin_transformer")
maxvit = pytest.importorskip("torchvision.models.maxvit")


def random_head_masks(analysis, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for g in analysis.groups:
        if g.prunable and g.size > 1:
            keep = torch.rand(g.size, generator=gen) > 0.5
            keep[torch.randint(g.size, (1,), generator=gen)] = True
            masks[g.name] = keep
    return masks


def assert_compacts_like_apply_masks(model, masks, x, analysis, exact: bool = True):
    small = fxprune.compact(model, masks, x, analysis=analysis, exact=exact)
    reference = fxprune.apply_masks(model, masks, x, analysis=analysis)
    with torch.no_grad():
        for inputs in (x, torch.randn_like(x)):
            torch.testing.assert_close(small(inputs), reference(inputs), rtol=1e-5, atol=1e-5)
    return small


def heads_of(analysis) -> list:
    return [g for g in analysis.groups if g.name.endswith("attn.qkv") or g.name.endswith("attn.cpb_mlp.2")]


@pytest.mark.parametrize("block, size", [
    (swin.SwinTransformerBlock, (8, 8)), (swin.SwinTransformerBlock, (6, 10)),
    (swin.SwinTransformerBlockV2, (8, 8)), (swin.SwinTransformerBlockV2, (6, 10)),
], ids=["v1", "v1-padded", "v2", "v2-padded"])
@pytest.mark.parametrize("shift", [0, 2], ids=["unshifted", "shifted"])
def test_swin_block_heads_are_units_and_their_removal_is_exact(block, size, shift):
    torch.manual_seed(0)
    model = randomize_constants(nn.Sequential(
        nn.Linear(5, 16), block(16, 4, window_size=[4, 4], shift_size=[shift, shift]), nn.Linear(16, 3))).eval()
    x = torch.randn(2, *size, 5)
    analysis = fxprune.analyze(model, x)
    with torch.no_grad():
        torch.testing.assert_close(analysis.gm(x), model(x), rtol=0, atol=0)  # the traced equivalent
    heads = heads_of(analysis)
    assert len(heads) == 1 and heads[0].size == 4 and heads[0].prunable
    for seed in range(3):
        masks = random_head_masks(analysis, seed)
        assert heads[0].name in masks
        small = assert_compacts_like_apply_masks(model, masks, x, analysis)
        kept = int(masks[heads[0].name].sum())
        assert small.get_parameter("1.attn.qkv.weight").shape == (3 * kept * 4, 16)
        assert small.get_parameter("1.attn.proj.weight").shape == (16, kept * 4)


@pytest.mark.parametrize("block, size", [(swin.SwinTransformerBlock, (8, 8)), (swin.SwinTransformerBlockV2, (6, 10))],
                         ids=["v1", "v2-padded"])
def test_swin_residual_stream_is_pruned_approximately_on_request(block, size):
    torch.manual_seed(0)
    model = randomize_constants(nn.Sequential(
        nn.Linear(5, 16), block(16, 4, window_size=[4, 4], shift_size=[2, 2]), nn.Linear(16, 3))).eval()
    x = torch.randn(1, *size, 5)  # padded to whole windows: the shift rolls padding with the channels
    analysis = fxprune.analyze(model, x)
    stream = analysis.group("0")
    assert not stream.exact and not stream.blocked and "LayerNorm" in stream.reason
    masks = {"0": torch.arange(16) % 4 != 0}
    with pytest.raises(fxprune.MaskError, match="exact=False"):
        fxprune.compact(model, masks, x, analysis=analysis)
    with pytest.warns(UserWarning, match="largest deviation"):
        small = fxprune.compact(model, masks, x, analysis=analysis, exact=False)
    assert small(x).shape == (1, *size, 3) and small.get_parameter("1.attn.qkv.weight").shape == (48, 12)
    assert small.meta["fxprune_deviation"] > 0


def test_maxvit_attention_heads_through_einsum_are_units():
    torch.manual_seed(0)
    model = randomize_constants(nn.Sequential(
        nn.Linear(5, 16), maxvit.RelativePositionalMultiHeadAttention(16, 4, 16), nn.Linear(16, 3))).eval()
    x = torch.randn(2, 3, 16, 5)  # (batch, windows, tokens per window, features)
    analysis = fxprune.analyze(model, x)
    heads = analysis.group("1.to_qkv")
    assert heads.size == 4 and heads.prunable
    for seed in range(3):
        masks = random_head_masks(analysis, seed)
        small = assert_compacts_like_apply_masks(model, masks, x, analysis)
        kept = int(masks["1.to_qkv"].sum())
        assert small.get_parameter("1.relative_position_bias_table").shape[1] == kept
        assert small.get_parameter("1.merge.weight").shape[1] == 4 * kept


def test_swin_patch_merging_takes_each_channel_from_four_tokens():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), swin.PatchMergingV2(8), nn.Linear(16, 3)).eval()  # norm after reduction
    x = torch.randn(1, 6, 5, 5)  # odd width: padded
    analysis = fxprune.analyze(model, x)
    assert analysis.group("0").prunable and analysis.group("0").size == 8
    small = assert_compacts_like_apply_masks(model, {"0": torch.arange(8) % 3 != 0}, x, analysis)
    columns = torch.cat([torch.tensor([1, 2, 4, 5, 7]) + 8 * k for k in range(4)])
    torch.testing.assert_close(small.get_parameter("1.reduction.weight"), model[1].reduction.weight[:, columns])


class FunctionalLinear(nn.Module):
    """F.linear on a parameter (as a module passing its weight to a function) and on a computed weight."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.weight, self.bias = nn.Parameter(torch.randn(5, 6)), nn.Parameter(torch.randn(5))
        self.c = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.nn.functional.linear(self.a(x), self.weight, self.bias).relu()
        return torch.nn.functional.linear(h, self.c.weight * 2, None)


def test_linear_function_on_a_parameter_produces_channels_and_on_a_computed_weight_reads_them():
    torch.manual_seed(0)
    model = FunctionalLinear().eval()
    x = torch.randn(7, 4)
    analysis = fxprune.analyze(model, x)
    assert analysis.group("a").prunable and analysis.group("a").size == 6
    assert analysis.group("weight").size == 5  # the parameter's rows, read by the computed weight's columns
    small = assert_compacts_like_apply_masks(model, {"a": torch.arange(6) != 2}, x, analysis)
    assert small.get_parameter("weight").shape == (5, 5)


class EinsumHeads(nn.Module):
    """Attention with literal head counts, as many libraries write it: q k^T by einsum, then matmul."""

    def __init__(self, dim: int = 12, heads: int = 3):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.einsum("bhid,bhjd->bhij", q, k).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


def test_heads_split_by_a_reshape_become_units_and_computed_sizes_follow():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 12), EinsumHeads(), nn.Linear(12, 2)).eval()
    x = torch.randn(2, 5, 4)
    analysis = fxprune.analyze(model, x)
    assert analysis.group("1.qkv").size == 3
    small = assert_compacts_like_apply_masks(model, {"1.qkv": torch.tensor([True, False, True])}, x, analysis)
    assert small.get_parameter("1.qkv.weight").shape == (24, 12)


class FusedHeads(nn.Module):
    """timm's attention: reshape into heads with a head size computed from the input width, then SDPA."""

    def __init__(self, dim: int = 12, heads: int = 3):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class SingleHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.nn.functional.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x)))


def test_scaled_dot_product_attention_heads_are_units_and_the_input_width_may_shrink():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 12), FusedHeads(), nn.Linear(12, 2)).eval()
    x = torch.randn(2, 5, 4)
    analysis = fxprune.analyze(model, x)
    assert analysis.group("1.qkv").size == 3 and analysis.group("0").prunable
    masks = {"1.qkv": torch.tensor([True, False, True]), "0": torch.arange(12) % 2 == 0}
    small = assert_compacts_like_apply_masks(model, masks, x, analysis)  # C // heads is rewritten
    assert small.get_parameter("1.qkv.weight").shape == (24, 6)


def test_scaled_dot_product_attention_default_scale_keeps_a_single_head_whole():
    torch.manual_seed(0)
    model = SingleHead().eval()
    x = torch.randn(2, 5, 4)
    analysis = fxprune.analyze(model, x)
    assert not analysis.group("q").exact and "scales by the head size" in analysis.group("q").reason
    assert analysis.group("v").prunable  # the values' features are out[..., d] alone
    assert_compacts_like_apply_masks(model, {"v": torch.arange(5) != 3}, x, analysis)


class CrossCovariance(nn.Module):
    """timm's XCiT attention: scores between feature dims of each head, scaled by a per-head parameter."""

    def __init__(self, dim: int = 12, heads: int = 3):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.temperature = nn.Parameter(torch.rand(heads, 1, 1) + 0.5)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 4, 1).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.temperature  # (B, heads, d, d)
        return self.proj((attn.softmax(-1) @ v).permute(0, 3, 1, 2).reshape(B, N, C))


def test_a_per_head_parameter_broadcast_over_a_head_joins_its_head():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 12), CrossCovariance(), nn.Linear(12, 2)).eval()
    x = torch.randn(2, 5, 4)
    analysis = fxprune.analyze(model, x)
    heads = analysis.group("1.qkv")
    assert heads.size == 3 and "1.temperature" in heads.producers
    small = assert_compacts_like_apply_masks(model, {"1.qkv": torch.tensor([True, False, True])}, x, analysis)
    assert small.get_parameter("1.temperature").shape == (2, 1, 1)


class SharedScores(nn.Module):
    """Scores summed over channels that may be non-zero when masked (both operands go through exp)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(3, 6)

    def forward(self, x):
        return torch.einsum("nc,mc->nm", self.a(x).exp(), self.b(x).exp())


def test_a_contraction_over_channels_that_may_be_non_zero_is_not_exact():
    analysis = fxprune.analyze(SharedScores(), torch.randn(4, 3))
    assert not analysis.group("a").exact and "may be non-zero when masked" in analysis.group("a").reason


@pytest.mark.skipif(not os.environ.get("FXPRUNE_SLOW"), reason="full models: set FXPRUNE_SLOW=1")
@pytest.mark.parametrize("name", ["swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b", "maxvit_t"])
def test_full_model_heads_are_prunable_and_exact(name):
    torch.manual_seed(0)
    model = randomize_constants(getattr(tv, name)(weights=None)).eval()
    x = torch.randn(1, 3, 224, 224)
    analysis = fxprune.analyze(model, x)
    masks = random_head_masks(analysis)
    assert sum(g.prunable for g in analysis.groups) > len(analysis.groups) // 2
    assert_compacts_like_apply_masks(model, masks, x, analysis)
