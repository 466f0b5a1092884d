"""``python -m spark_backup`` and the ``spark-backup`` script.

Ctrl-C while the command line is still being imported (half a second, longer on a loaded host)
exits 130 like an interrupt anywhere else, not with a traceback and a death by SIGINT.
"""

import os
import signal
import sys
import time
from contextlib import suppress
from types import FrameType

INTERRUPTED = 130
_interrupt_seen = False


# How long an interrupt may wait for the import it landed in (imports take milliseconds; one
# that hangs must not make Ctrl-C useless).
IMPORT_GRACE_SECONDS = 2.0
_first_deferred: float | None = None


def _note_interrupt(signum: int, frame: FrameType | None) -> None:
    """Python's own SIGINT handler, remembering that it ran, and holding an interrupt that
    lands inside an import until the import is done: an extension module cut short while it
    initialises (pyrage's Rust code) panics and prints its own trace, and a module cut short is
    left half made. The interrupt comes back as SIGALRM a few milliseconds later."""
    global _interrupt_seen, _first_deferred
    _interrupt_seen = True
    now = time.monotonic()
    if _inside_an_import(frame) and now - (_first_deferred or now) < IMPORT_GRACE_SECONDS:
        _first_deferred = _first_deferred or now
        signal.setitimer(signal.ITIMER_REAL, 0.005)
        return
    raise KeyboardInterrupt


def _inside_an_import(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def main() -> None:
    signal.signal(signal.SIGINT, _note_interrupt)
    signal.signal(signal.SIGALRM, _note_interrupt)  # an interrupt held back by an import
    from spark_backup.engine.gc_pause import pause_during_startup

    pause_during_startup()  # until the command has opened its plan (CliState)
    try:
        from spark_backup.cli import main as run

        run()
    except KeyboardInterrupt:
        exit_interrupted()
    except SystemExit:
        raise
    except BaseException as error:
        # Ctrl-C while a class is made (a dataclass field's __set_name__, as modules import)
        # arrives wrapped in a RuntimeError (CPython 3.11); while a Rust extension (pyrage)
        # initialises its module, as a PanicException that names no cause at all.
        if _interrupt_seen or _caused_by_interrupt(error):
            exit_interrupted()
        raise


def _caused_by_interrupt(error: BaseException) -> bool:
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def exit_interrupted() -> None:
    """Say so in one line and exit 130. ``os._exit``, not ``sys.exit``: once a KeyboardInterrupt
    has passed through code run by ``exec`` (dataclasses and namedtuples make their methods
    so), CPython ends ``python -m`` by killing itself with SIGINT even after the exception was
    handled (exit -2 instead of 130). Everything the command opened was closed on the way here."""
    with suppress(ValueError):  # outside the main thread there is no Ctrl-C to ignore
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second one does not cut this short
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # nor one held back by an import
    with suppress(OSError, ValueError):
        sys.stdout.flush()
    with suppress(OSError, ValueError):
        sys.stderr.write("interrupted: nothing unfinished was published\n")
        sys.stderr.flush()
    os._exit(INTERRUPTED)


if __name__ == "__main__":
    main()
