"""The tools spark-backup starts (GNU tar, pg_dump, the age worker): their environment, and
streaming their output.

Only what a tool needs to run is passed on: the private key ($SPARK_BACKUP_IDENTITY) and store
credentials live in the environment of spark-backup itself, and a child's environment can be
read from /proc by its owner and by root for as long as it runs.
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import BinaryIO

from spark_backup.engine.streams import widen_pipe
from spark_backup.errors import SourceError

_PASSED_ON = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONPATH", "PYTHONHOME")

# glibc's allocator hands buffers of 128 KiB and more back to the kernel when they are freed, so
# every 1 MiB piece of a stream cost fresh zeroed pages: about a quarter of the age worker's
# time on a tree restore, 0.07-0.1 of a 923 MB backup's 4.1 CPU-seconds. These thresholds keep
# them for reuse (a few MiB of heap more: peak RSS 155 MB against 153).
_MMAP_THRESHOLD = 16 << 20
_TRIM_THRESHOLD = 64 << 20
# The same for a Python process started here (the age worker), through glibc's environment.
ALLOCATOR_ENVIRONMENT = {
    "MALLOC_MMAP_THRESHOLD_": str(_MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD),
}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)


@functools.cache
def keep_freed_buffers() -> None:
    """The thresholds of ``ALLOCATOR_ENVIRONMENT`` for this process, from now on (a backup's
    streams), set once: a resident service (the WAL pusher) stores many copies. Best effort:
    without glibc's ``mallopt`` the allocator stays as it is."""
    import ctypes  # a backup's alone

    with suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


def tool_environment() -> dict[str, str]:
    return {
        name: value
        for name, value in os.environ.items()
        if name in _PASSED_ON or name.startswith("LC_")
    }


class ToolOutput:
    """A running tool's stdout to read from; after the block, its stderr lines."""

    def __init__(self, stdout: BinaryIO):
        self.stdout = stdout
        self.messages: list[str] = []

    def read(self, size: int = -1, /) -> bytes:
        return self.stdout.read(size)


@contextmanager
def streamed_tool(args: Sequence[str], env: dict[str, str], label: str) -> Iterator[ToolOutput]:
    """Run ``args`` and stream its stdout. On exit the tool must have ended with status 0 and
    its output must have been read to the end; otherwise ``SourceError`` names ``label`` and
    the tool's first error line. An exception in the block stops the tool."""
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=stderr, env=env)
        assert process.stdout is not None
        # A 64 KiB pipe woke this reader and put the tool to sleep about 80,000 times for a
        # 513 MB pg_dump in 4 KiB writes, three times as often as a 1 MiB one; and the 1 MiB
        # writes pg_dump makes under stdbuf fit whole.
        widen_pipe(process.stdout.fileno())
        output = ToolOutput(process.stdout)
        try:
            yield output
            leftover = process.stdout.read(1)
        except BaseException:
            process.kill()
            raise
        finally:
            process.stdout.close()
            status = process.wait()
        stderr.seek(0)
        output.messages = stderr.read().decode(errors="replace").splitlines()
    if status != 0:
        raise SourceError(f"{label}: {first_error(output.messages, status)}")
    if leftover:
        raise SourceError(f"{label}: output was not read to its end")


def first_error(messages: Sequence[str], status: int) -> str:
    """The line of a tool's stderr that says what went wrong (else its exit status)."""
    lines = [m.strip() for m in messages if m.strip()]
    for line in lines:
        if "error" in line.lower() or "fatal" in line.lower():
            return line
    return lines[0] if lines else f"exited with status {status}"


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a server we start)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
