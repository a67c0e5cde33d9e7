"""fxprune: structured pruning and growth of PyTorch models as exact torch.fx graph rewrites."""
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
