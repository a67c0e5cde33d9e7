import importlib.util

import pytest
import torch

from fxprune import zoo

requires_torchvision = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed"
)


@requires_torchvision
def test_torchvision_models_builds_a_model():
    models = zoo.torchvision_models()
    assert models.__name__ == "torchvision.models"
    assert zoo.torchvision_models() is models
    net = models.resnet18(num_classes=7).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@requires_torchvision
def test_classification_model_names():
    names = zoo.classification_model_names()
    assert {"resnet18", "mobilenet_v3_small", "vgg11"} <= set(names)
    assert "fasterrcnn_resnet50_fpn" not in names
    assert names == sorted(names)


def test_missing_torchvision_raises_import_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(ImportError, match="torchvision is not installed"):
        zoo.torchvision_models()


def test_randomize_constants_redraws_constant_parameters_and_statistics():
    import torch
    from torch import nn

    from fxprune.zoo import randomize_constants

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Linear(4, 3))
    nn.init.zeros_(model[2].weight)
    varied = model[0].weight.detach().clone()
    randomize_constants(model)
    assert model[2].weight.std() > 0 and model[1].weight.std() > 0 and model[1].running_var.std() > 0
    assert (model[1].weight - 1).abs().max() <= 0.5 and model[1].running_var.min() >= 0.5
    torch.testing.assert_close(model[0].weight, varied, rtol=0, atol=0)  # already varied: untouched
