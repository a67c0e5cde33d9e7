"""timm models (pretrained=False, constants redrawn): each group compacts exactly or is refused by
``analyze`` with a reason; a model FX cannot trace raises TraceError naming the construct."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

import fxprune
from fxprune.zoo import randomize_constants
from zoo_check import assert_exact_or_refused

if importlib.util.find_spec("timm") is None:  # pragma: no cover - depends on the environment
    pytest.skip("timm is not installed (make venv installs it)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the benchmark's model list
import timm_coverage  # noqa: E402

# One tiny model per family by default (timm's test_ models, and small ones at 64x64); FXPRUNE_SLOW=1
# runs every model of benchmarks/timm_coverage.py (about an hour on 2 cores).
DEFAULT = ("test_resnet", "test_efficientnet", "test_convnext", "test_byobnet", "test_nfnet", "test_coatnet",
           "test_maxvit", "regnetx_002", "mobilenetv3_small_050", "dla46x_c", "ghostnet_050")
TRACE_ERRORS = {"test_vit": ("VisionTransformer", "control flow")}


@pytest.mark.parametrize("name", sorted(set(DEFAULT) | set(timm_coverage.names())))
def test_model_compacts_exactly_or_refuses(name: str) -> None:
    if name not in DEFAULT and not os.environ.get("FXPRUNE_SLOW"):
        pytest.skip(f"{name}: set FXPRUNE_SLOW=1 for every timm model of the benchmark")
    model, x = timm_coverage.build(name, seed=0)
    try:
        assert_exact_or_refused(model, x, name)
    except fxprune.TraceError as e:  # untraceable: the message says where and why
        assert " at " in str(e) and ".py:" in str(e), e
        pytest.skip(f"{name}: {e}")


@pytest.mark.parametrize("name", sorted(TRACE_ERRORS))
def test_untraceable_model_names_the_module_and_the_construct(name: str) -> None:
    model = randomize_constants(timm_coverage.create(name)).eval()
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.analyze(model, torch.randn(1, 3, *timm_coverage.default_size(name)))
    message = str(info.value)
    for needle in TRACE_ERRORS[name]:
        assert needle in message
    assert ".py:" in message  # the line of the model's code
