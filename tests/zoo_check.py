"""The coverage check that tests/test_torchvision.py and tests/test_timm.py run on library models."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxprune


def assert_exact_or_refused(model: nn.Module, x: torch.Tensor, name: str) -> None:
    """Every group either is refused by ``analyze`` with a reason, or compacts exactly: random masks
    over all prunable groups (and every other removable layer removed) give ``compact`` equal to
    ``apply_masks``, with fewer parameters."""
    analysis = fxprune.analyze(model, x)
    assert analysis.groups
    for g in analysis.groups:
        assert g.prunable or g.reason, f"{g.name} is not prunable but has no reason"
    masks = {}
    for g in analysis.groups:
        if g.prunable and g.size > 1:
            keep = torch.rand(g.size) > 0.3
            keep[0] = True
            masks[g.name] = keep
    if not masks:
        pytest.skip(f"{name}: no prunable group; reasons: {sorted({g.reason for g in analysis.groups})[:3]}")
    masks.update({layer.name: False for layer in analysis.layers[::2]})
    with warnings.catch_warnings():  # masks that keep a unit of every group never fail (ShuffleNet once did)
        warnings.simplefilter("ignore", UserWarning)
        small = fxprune.compact(model, masks, x, analysis=analysis)
    reference = fxprune.apply_masks(model, masks, x, analysis=analysis)
    with torch.no_grad():
        expected, got = reference(x), small(x)
    scale = expected.abs().max().clamp(min=1e-12)
    assert ((expected - got).abs().max() / scale).item() < 1e-5
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
