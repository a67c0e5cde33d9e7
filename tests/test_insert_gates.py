"""insert_gates: gates folded into BatchNorm affine parameters equal gates that multiply the output."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.modules.gate import Gate, GatedBatchNorm
from fxprune.passes.insert_gates import gates_of, insert_gates

from test_budget import Residual


def random_gate(key: str, size: int, generator: torch.Generator) -> Gate:
    """Some units gated off; every group keeps its first unit, the first layer gate is off."""
    gate = Gate(key, size)
    with torch.no_grad():
        gate.weight.copy_(torch.rand(size, generator=generator) - 0.3)
        gate.weight[0] = 1.0 if size > 1 else -1.0 if key == "blocks.0" else gate.weight[0]
    return gate


@pytest.mark.parametrize("seed", range(3))
def test_gates_folded_into_batchnorms_are_apply_masks_of_their_hard_values(seed):
    torch.manual_seed(seed)
    model, x = Residual(8, 3).eval(), torch.randn(2, 1, 8, 8)
    analysis = fxprune.analyze(model, x)
    generator = torch.Generator().manual_seed(seed)
    gated = insert_gates(analysis, lambda key, size: random_gate(key, size, generator))
    assert sum(isinstance(m, GatedBatchNorm) for m in gated.modules()) == 7  # every BN: stem, 2 per block
    assert not any(n.op == "get_attr" for n in gated.graph.nodes)  # no gate multiplies a whole output
    with torch.no_grad():
        for gate in gates_of(gated):
            gate.weight.copy_((gate.weight > 0).float())  # 0/1 values: the gated model is apply_masks
        masks = {g.key: g.hard() if g.weight.numel() > 1 else bool(g.hard()) for g in gates_of(gated)}
        assert masks["blocks.0"] is False
        reference = fxprune.apply_masks(model, masks, x, analysis=analysis)
        assert torch.allclose(gated(x), reference(x), atol=1e-6)


def test_a_folded_gate_trains_like_one_that_multiplies():
    """In training mode: the same output, running statistics and gradients as ``bn(x) * g``."""
    torch.manual_seed(0)
    bn, x = nn.BatchNorm2d(5, momentum=None), torch.randn(4, 5, 3, 3)
    g = torch.rand(5, requires_grad=True)
    layer = torch.rand(1, requires_grad=True)
    folded = GatedBatchNorm(copy.deepcopy(bn))
    folded.add_gate(torch.arange(5))
    folded.add_gate(torch.zeros(5, dtype=torch.long))  # a layer gate: one value for every channel
    for _ in range(2):
        want = bn(x) * g.view(1, -1, 1, 1) * layer
        got = folded(x, gates=(g, layer))
        assert torch.allclose(got, want, atol=1e-6)
        grads = torch.autograd.grad((want * x).sum(), [g, layer, bn.weight, bn.bias])
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(
            grads, torch.autograd.grad((got * x).sum(), [g, layer, folded.module.weight, folded.module.bias])))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(folded.module, name), getattr(bn, name)), name
    folded.eval(), bn.eval()
    assert torch.allclose(folded(x, gates=(g, layer)), bn(x) * g.view(1, -1, 1, 1) * layer, atol=1e-6)


def test_only_plain_affine_batchnorms_fold():
    with pytest.raises(TypeError, match="affine"):
        GatedBatchNorm(nn.BatchNorm1d(4, affine=False))
    with pytest.raises(TypeError, match="affine"):
        GatedBatchNorm(nn.SyncBatchNorm(4))  # computes otherwise under torch.distributed
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 1, 6, 6)
    gated = insert_gates(fxprune.analyze(model, x), lambda key, size: random_gate(key, size, torch.Generator()))
    assert not any(isinstance(m, GatedBatchNorm) for m in gated.modules())
    masks = {g.key: g.hard() for g in gates_of(gated)}
    with torch.no_grad():
        for gate in gates_of(gated):
            gate.weight.copy_(gate.hard().float())
        assert torch.allclose(gated.eval()(x), fxprune.apply_masks(model, masks, x).eval()(x), atol=1e-6)


def test_gates_that_multiply_train_too():
    """Where no BatchNorm follows (a linear layer), the gate multiplies the output."""
    model, x = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), torch.randn(5, 4)
    gated = insert_gates(fxprune.analyze(model, x), lambda key, size: Gate(key, size, init=0.5))
    loss = F.mse_loss(gated(x), torch.zeros(5, 3))
    loss.backward()
    (gate,) = gates_of(gated)
    assert gate.weight.grad is not None and bool(gate.weight.grad.abs().sum() > 0)


@pytest.mark.parametrize("share", [False, True])
def test_the_gated_copy_leaves_the_analysed_model_alone_and_shares_tensors_only_when_asked(share):
    model, x = Residual(8, 2), torch.randn(2, 1, 8, 8)
    analysis = fxprune.analyze(model, x)
    gated = insert_gates(analysis, share_tensors=share)
    assert not any(isinstance(m, GatedBatchNorm) for m in analysis.gm.modules())
    original = {id(t) for t in [*analysis.gm.parameters(), *analysis.gm.buffers()]}
    copied = [t for name, t in [*gated.named_parameters(), *gated.named_buffers()] if "gates" not in name
              and "units" not in name]
    assert all((id(t) in original) == share for t in copied)
