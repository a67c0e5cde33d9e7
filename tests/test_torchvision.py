"""Every torchvision classification model: each group compacts exactly, or is flagged with a reason."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from zoo_check import assert_exact_or_refused

zoo = pytest.importorskip("fxprune.zoo")
try:
    MODELS = zoo.torchvision_models()
except ImportError as e:  # pragma: no cover - depends on the environment
    pytest.skip(f"torchvision is not installed: {e}", allow_module_level=True)

# One model of each family runs by default; FXPRUNE_SLOW=1 runs all of them (about half an hour on
# 2 cores; benchmarks/torchvision_coverage.py writes the same check as a table).
FAMILIES = {
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
    "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
    "regnet_y_400mf", "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1",
    "swin_t", "swin_v2_t", "vgg11_bn", "vit_b_16", "wide_resnet50_2",
}
NAMES = zoo.classification_model_names()
FIXED_SIZE = {"vit": 224, "swin": 224, "maxvit": 224, "inception": 299, "googlenet": 96, "efficientnet_v2": 128}


def input_size(name: str) -> int:
    return next((s for prefix, s in FIXED_SIZE.items() if name.startswith(prefix)), 64)


@pytest.mark.parametrize("name", NAMES)
def test_model_compacts_exactly_or_flags(name: str) -> None:
    if name not in FAMILIES and not os.environ.get("FXPRUNE_SLOW"):
        pytest.skip(f"{name}: another model of its family runs by default; set FXPRUNE_SLOW=1 for all")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = zoo.randomize_constants(getattr(MODELS, name)(weights=None)).eval()  # e.g. ViT's zero head
    size = input_size(name)
    assert_exact_or_refused(model, torch.randn(1, 3, size, size), name)
