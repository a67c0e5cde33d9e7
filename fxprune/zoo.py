"""Access to torchvision's model definitions, with or without its compiled extension."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

__all__ = ["classification_model_names", "randomize_constants", "timm_models", "torchvision_models"]


def _models_without_extension(package_dirs: list[str]) -> ModuleType:
    # A failed ``import torchvision`` leaves some submodules behind; drop them so the
    # bare package below starts clean.
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    spec = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    spec.submodule_search_locations = list(package_dirs)
    package = importlib.util.module_from_spec(spec)
    # ``inspect`` (used by torch.library) rejects modules whose ``__file__`` is None.
    package.__file__ = os.path.join(package_dirs[0], "__init__.py")
    sys.modules["torchvision"] = package
    return importlib.import_module("torchvision.models")


def torchvision_models() -> ModuleType:
    """Return the ``torchvision.models`` module.

    When torchvision's compiled extension does not load (a torchvision build that
    does not match the installed torch), the pure-Python model definitions are
    imported without running ``torchvision/__init__.py``; ops that need the
    extension (e.g. ``torchvision.ops.nms``) are then unavailable.
    """
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(
            "torchvision is not installed; install it with `pip install --no-deps torchvision` "
            "(a version matching your torch, e.g. torchvision==0.28.0 for torch==2.13.0)"
        )
    try:
        return importlib.import_module("torchvision.models")
    except RuntimeError:  # e.g. "operator torchvision::nms does not exist"
        return _models_without_extension(spec.submodule_search_locations)


def classification_model_names() -> list[str]:
    """Names of torchvision's classification model factories, e.g. ``"resnet18"``."""
    models = torchvision_models()
    return models.list_models(module=models)


def timm_models() -> ModuleType:
    """Return the ``timm`` package (PyTorch Image Models), importable even where torchvision's compiled
    extension does not load (timm imports torchvision, whose pure-Python parts are then used)."""
    if importlib.util.find_spec("timm") is None:
        raise ImportError("timm is not installed; install it with `pip install --no-deps timm` plus "
                          "huggingface_hub, safetensors and pyyaml (`make venv` does)")
    torchvision_models()
    return importlib.import_module("timm")


def randomize_constants(model: "torch.nn.Module", seed: int = 0) -> "torch.nn.Module":
    """Redraw, in place, every parameter that holds one repeated value (a zero-initialised
    classifier, unit norm scales, 1e-6 layer scales) and every BatchNorm's statistics, so that a
    wrongly removed, kept or folded channel changes the output of an untrained model. Returns it."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def redraw(t: "torch.Tensor", low: float, high: float) -> None:
        t.copy_(torch.rand(t.shape, generator=generator, dtype=t.dtype) * (high - low) + low)

    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and p.is_floating_point() and bool((p == p.flatten()[0]).all()):
                value = float(p.flatten()[0])
                spread = max(abs(value), 0.2) / 2 if abs(value) > 1e-3 else 0.1
                redraw(p, value - spread, value + spread)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                redraw(m.running_mean, -0.1, 0.1)
                redraw(m.running_var, 0.5, 1.5)
    return model
