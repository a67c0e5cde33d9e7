"""Pausing Python's cyclic garbage collector while a pass builds many objects."""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Run the body with automatic garbage collection off (restored afterwards).

    Tracing, analysing and rewriting a graph create tens of objects per node that all stay alive
    until the pass returns; every collection the allocations trigger meanwhile walks all of them
    again, which costs as much as the pass itself on large graphs. Nothing is leaked: the
    collector runs as usual once the pass is done. Also usable as a decorator.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
