"""Channel rules, one module per op family. Importing this package registers them all."""
from . import (  # noqa: F401  (imported for their registrations)
    activation,
    arithmetic,
    attention,
    concat,
    contraction,
    conv,
    embedding,
    linear,
    metadata,
    norm,
    padding,
    pooling,
    recurrent,
    reduction,
    reshape,
    windows,
)
from .registry import RULES, RuleContext, find_rule, rule

__all__ = ["RULES", "RuleContext", "find_rule", "rule"]
