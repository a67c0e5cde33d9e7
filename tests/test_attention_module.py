"""PrunedMultiheadAttention: nn.MultiheadAttention semantics with fewer heads than embed_dim holds."""
import pytest
import torch
from torch import nn

from fxprune.modules.attention import PrunedMultiheadAttention

E, H, L, S, N = 16, 4, 4, 6, 3  # embed_dim, heads, target length, source length, batch
KDIM, VDIM = 10, 12


def _pair(seed: int = 0, **kw) -> tuple[nn.MultiheadAttention, PrunedMultiheadAttention]:
    """A random nn.MultiheadAttention and a PrunedMultiheadAttention loaded from its state_dict."""
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(E, H, **kw).eval()
    with torch.no_grad():  # nonzero biases, so they are exercised too
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    mha = PrunedMultiheadAttention(E, H, E // H, **kw).eval()
    mha.load_state_dict(ref.state_dict())
    return ref, mha


def _masks(case: str, batched: bool, tgt: int = L, src: int = S) -> dict:
    """Masks for tgt queries attending to src keys; no query row is fully masked."""
    g = torch.Generator().manual_seed(1)
    kpm = torch.zeros(N, src, dtype=torch.bool)
    kpm[1, -2:] = kpm[2, -1] = True
    causal = torch.ones(tgt, src, dtype=torch.bool).triu(1)
    bool2d = torch.rand(tgt, src, generator=g) < 0.3
    bool2d[:, 0] = False
    bool3d = torch.rand(N * H, tgt, src, generator=g) < 0.3
    bool3d[..., 0] = False
    float2d, float3d = torch.randn(tgt, src, generator=g), torch.randn(N * H, tgt, src, generator=g)
    kw = {
        "none": {},
        "kpm": {"key_padding_mask": kpm},
        "kpm_float": {"key_padding_mask": torch.zeros(N, src).masked_fill(kpm, float("-inf"))},
        "bool2d": {"attn_mask": bool2d},
        "float2d": {"attn_mask": float2d},
        "bool3d": {"attn_mask": bool3d},
        "float3d": {"attn_mask": float3d},
        "kpm_bool2d": {"key_padding_mask": kpm, "attn_mask": bool2d},
        "causal": {"attn_mask": causal, "is_causal": True},
        "causal_kpm": {"attn_mask": causal, "is_causal": True, "key_padding_mask": kpm},
        # is_causal is a hint: without need_weights or padding mask, torch ignores attn_mask
        "causal_hint": {"attn_mask": bool2d, "is_causal": True},
    }[case]
    if not batched:
        if "key_padding_mask" in kw:
            kw["key_padding_mask"] = kw["key_padding_mask"][1]
        if "attn_mask" in kw and kw["attn_mask"].dim() == 3:
            kw["attn_mask"] = kw["attn_mask"][:H]
    return kw


MODULES = [
    pytest.param(dict(batch_first=bf, kdim=kd, vdim=vd, bias=b, add_bias_kv=bkv, add_zero_attn=za), id=name)
    for bf in (False, True)
    for kd, vd in ((None, None), (KDIM, VDIM))
    for b in (True, False)
    for bkv in (False, True)
    for za in (False, True)
    for name in [f"bf{bf:d}-{'packed' if kd is None else 'kv'}-bias{b:d}-biaskv{bkv:d}-zero{za:d}"]
]
MASKS = [
    "none", "kpm", "kpm_float", "bool2d", "float2d", "bool3d", "float3d", "kpm_bool2d", "causal", "causal_kpm", "causal_hint",
]


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("kw", MODULES)
def test_matches_multihead_attention(kw: dict, mask: str) -> None:
    ref, mha = _pair(**kw)
    g = torch.Generator().manual_seed(2)
    for batched in (True, False):
        if batched:
            lead_q, lead_k = ((N, L), (N, S)) if kw["batch_first"] else ((L, N), (S, N))
        else:
            lead_q, lead_k = (L,), (S,)
        query = torch.randn(*lead_q, E, generator=g)
        key = torch.randn(*lead_k, kw["kdim"] or E, generator=g)
        value = torch.randn(*lead_k, kw["vdim"] or E, generator=g)
        if kw["kdim"] is None:
            calls = [(query, query, query), (query, key, value)]  # self- and cross-attention
        else:
            calls = [(query, key, value)]
        for args in calls:
            masks = _masks(mask, batched, src=L if args[1] is query else S)
            for need, avg in ((False, True), (True, True), (True, False)):
                opts = dict(masks, need_weights=need, average_attn_weights=avg)
                expected, expected_w = ref(*args, **opts)
                out, w = mha(*args, **opts)
                torch.testing.assert_close(out, expected)
                if need:
                    torch.testing.assert_close(w, expected_w)
                else:
                    assert w is None


def test_is_causal_needs_attn_mask() -> None:
    _, mha = _pair()
    x = torch.randn(L, N, E)
    with pytest.raises(RuntimeError, match="attn_mask"):
        mha(x, x, x, is_causal=True)


def test_dropout_only_in_training() -> None:
    ref, mha = _pair(dropout=0.5)
    x = torch.randn(L, N, E)
    mha.train()
    ref.train()
    torch.manual_seed(3)
    expected = ref(x, x, x)
    torch.manual_seed(3)
    out = mha(x, x, x)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(mha(x, x, x, need_weights=False)[0], mha.eval()(x, x, x, need_weights=False)[0])


def _slice_heads(sd: dict, keep: list[int], head_dim: int) -> dict:
    """Keep the q, k, v rows and out_proj columns of heads `keep` (the layout nn.MultiheadAttention uses)."""
    idx = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in keep])
    inner = sd["out_proj.weight"].shape[1]
    qkv = torch.cat([idx + i * inner for i in range(3)])
    out = {}
    for name, t in sd.items():
        if name in ("in_proj_weight", "in_proj_bias"):
            t = t[qkv]
        elif name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            t = t[idx]
        elif name in ("bias_k", "bias_v"):
            t = t[..., idx]
        elif name == "out_proj.weight":
            t = t[:, idx]
        out[name] = t
    return out


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kdim", [None, KDIM])
@pytest.mark.parametrize("add_bias_kv", [False, True])
def test_head_removal_is_exact(batch_first: bool, kdim: int | None, add_bias_kv: bool) -> None:
    kw = dict(batch_first=batch_first, kdim=kdim, vdim=kdim and VDIM, add_bias_kv=add_bias_kv)
    ref, _ = _pair(**kw)
    head_dim, keep, drop = E // H, [0, 2], [1, 3]
    rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in drop])
    with torch.no_grad():  # silence heads 1 and 3: zero queries, keys and values
        if ref.in_proj_weight is not None:
            for i in range(3):
                ref.in_proj_weight[rows + i * E] = 0
        else:
            for w in (ref.q_proj_weight, ref.k_proj_weight, ref.v_proj_weight):
                w[rows] = 0
        for i in range(3):
            ref.in_proj_bias[rows + i * E] = 0
        if add_bias_kv:
            ref.bias_k[..., rows] = 0
            ref.bias_v[..., rows] = 0

    pruned = PrunedMultiheadAttention(E, len(keep), head_dim, **kw).eval()
    pruned.load_state_dict(_slice_heads(ref.state_dict(), keep, head_dim))
    assert pruned.out_proj.weight.shape == (E, len(keep) * head_dim)

    g = torch.Generator().manual_seed(4)
    lead_q, lead_k = ((N, L), (N, S)) if batch_first else ((L, N), (S, N))
    query = torch.randn(*lead_q, E, generator=g)
    key = torch.randn(*lead_k, kdim or E, generator=g)
    value = torch.randn(*lead_k, VDIM if kdim else E, generator=g)
    kpm = _masks("kpm", True)["key_padding_mask"]
    for masks in ({}, {"key_padding_mask": kpm}):
        expected, _ = ref(query, key, value, need_weights=False, **masks)
        out, _ = pruned(query, key, value, need_weights=False, **masks)
        torch.testing.assert_close(out, expected)


class _Block(nn.Module):
    """Self-attention with a residual, as in a transformer layer."""

    def __init__(self, need_weights: bool) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.attn = PrunedMultiheadAttention(E, 2, 3, batch_first=True, add_bias_kv=True)
        self.need_weights = need_weights

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, w = self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=self.need_weights)
        return x + out, (w if self.need_weights else out.sum(-1))


def _inputs(batched: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    kpm = _masks("kpm", True)["key_padding_mask"]
    x = torch.randn(N, S, E, generator=torch.Generator().manual_seed(6))
    return (x, kpm) if batched else (x[1], kpm[1])


@pytest.mark.parametrize("need_weights", [False, True])
def test_fx_symbolic_trace(need_weights: bool) -> None:
    block = _Block(need_weights).eval()
    gm = torch.fx.symbolic_trace(block)
    assert any(n.op == "call_module" and n.target == "attn.out_proj" for n in gm.graph.nodes)
    for batched in (True, False):  # the graph holds no batch-size or rank specialisation
        inputs = _inputs(batched)
        torch.testing.assert_close(gm(*inputs), block(*inputs))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("need_weights", [False, True])
def test_onnx_export_runs_in_onnxruntime(need_weights: bool, tmp_path) -> None:
    pytest.importorskip("onnx", reason="onnx is not installed")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    block = _Block(need_weights).eval()
    inputs = _inputs()
    path = tmp_path / "attn.onnx"
    torch.onnx.export(
        block, inputs, str(path), dynamo=False, opset_version=17,
        input_names=["x", "key_padding_mask"], output_names=["y", "w"],
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": inputs[0].numpy(), "key_padding_mask": inputs[1].numpy()})
    for g, e in zip(got, block(*inputs)):
        torch.testing.assert_close(torch.from_numpy(g), e, rtol=1e-4, atol=1e-5)
