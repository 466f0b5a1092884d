"""Pausing the cyclic garbage collector where a command makes many objects in no cycle."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def without_cyclic_gc() -> Iterator[None]:
    """Objects made in the block (a listing's few per copy, a version's lists per chunk) are in
    no cycle: the cyclic collector would only walk them again and again as they pile up (a
    third of the CPU of `list` at 5,000 copies). Reference counting still frees everything."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
