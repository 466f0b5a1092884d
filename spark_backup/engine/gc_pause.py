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


# Start-up (importing the command line, pydantic and the plan's models, reading the plan) makes
# some hundred thousand objects that live as long as the process, in few cycles: at the usual
# threshold (700) the collector walks them about 80 times, 10-15 ms of every command.
_STARTUP_THRESHOLD = 100_000
_usual_thresholds: tuple[int, int, int] | None = None


def pause_during_startup() -> None:
    """Collect young objects rarely until ``startup_done``: the process's first call."""
    global _usual_thresholds
    if _usual_thresholds is None:
        _usual_thresholds = gc.get_threshold()
        gc.set_threshold(_STARTUP_THRESHOLD, *_usual_thresholds[1:])


def startup_done() -> None:
    """The usual thresholds again, once the command has what it needs to start its work (a long
    backup or a service makes garbage in cycles too); what start-up made is frozen, so later
    full collections walk none of it. The few hundred objects start-up left in cycles (400 for
    ``list`` of the benchmark's plan, against 35,000 kept) are frozen with it, never freed."""
    global _usual_thresholds
    if _usual_thresholds is not None:
        gc.freeze()
        gc.set_threshold(*_usual_thresholds)
        _usual_thresholds = None
