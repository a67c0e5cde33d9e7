"""Errors that fxprune raises on bad input."""


class FxpruneError(Exception):
    """Base class of fxprune's errors."""


class TraceError(FxpruneError):
    """The model cannot be traced into an FX graph; the message names the module and construct."""


class MaskError(FxpruneError, ValueError):
    """A mask is invalid; the message names the key at fault."""


class CompactError(FxpruneError):
    """A graph could not be rewritten; the message names the node at fault."""
