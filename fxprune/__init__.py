"""fxprune: structured pruning and growth of PyTorch models as exact torch.fx graph rewrites."""
from .analysis import Analysis, ChannelGroup, GroupMember, analyze
from .compact import apply_masks, compact
from .cost import Cost, cost
from .errors import CompactError, FxpruneError, MaskError, TraceError
from .trace import trace

__all__ = [
    "Analysis", "ChannelGroup", "CompactError", "Cost", "FxpruneError", "GroupMember", "MaskError",
    "TraceError", "analyze", "apply_masks", "compact", "cost", "trace",
]
