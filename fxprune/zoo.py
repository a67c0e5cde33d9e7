"""Access to torchvision's model definitions, with or without its compiled extension."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

__all__ = ["classification_model_names", "torchvision_models"]


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
