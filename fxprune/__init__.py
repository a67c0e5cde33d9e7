"""fxprune: structured pruning and growth of PyTorch models as exact torch.fx graph rewrites."""
import importlib
from types import ModuleType

from .analysis import Analysis, ChannelGroup, GroupMember, analyze
from .checkpoint import load, save
from .compact import apply_masks, compact
from .cost import Cost, cost
from .errors import (CheckpointError, CompactError, DistributedError, ExportError, FxpruneError, GrowError, MaskError,
                     TraceError)
from .grow import grow
from .layers import Layer
from .mapping import Mapping, TensorMap
from .optim import remap_optimizer
from .trace import trace

__all__ = [
    "Analysis", "ChannelGroup", "CheckpointError", "CompactError", "Cost", "DistributedError", "ExportError",
    "FxpruneError", "GroupMember", "GrowError", "Layer", "Mapping", "MaskError", "TensorMap", "TraceError", "analyze",
    "apply_masks", "compact", "cost", "grow", "load", "remap_optimizer", "save", "trace",
]

# submodules imported on first use (``fxprune.export.to_onnx`` after ``import fxprune``), so that
# ``import fxprune`` does not pay for the training loop, datasets or ONNX
LAZY_SUBMODULES = ("data", "export", "methods", "zoo")


def __getattr__(name: str) -> ModuleType:
    if name in LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fxprune' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(LAZY_SUBMODULES))
