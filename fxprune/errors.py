"""Errors that fxprune raises on bad input."""


class FxpruneError(Exception):
    """Base class of fxprune's errors."""


class TraceError(FxpruneError):
    """The model cannot be traced into an FX graph; the message names the module and construct."""


class MaskError(FxpruneError, ValueError):
    """A mask is invalid; the message names the key at fault."""


class CompactError(FxpruneError):
    """A graph could not be rewritten; the message names the node at fault."""


class ExportError(FxpruneError):
    """A model could not be exported, or its export disagrees with PyTorch; the message names the
    output, operator or engine step at fault."""


class CheckpointError(FxpruneError):
    """A model cannot be saved, or a file cannot be loaded, as an fxprune checkpoint; the message
    names the file, node or module at fault."""


class GrowError(FxpruneError):
    """A growth request that cannot be carried out as asked."""


class DistributedError(FxpruneError):
    """The ranks of a distributed run disagree (model, masks, settings or data); raised on every
    rank, naming the rank and what differs."""
