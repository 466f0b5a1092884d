"""The tools spark-backup starts (GNU tar, pg_dump, the age worker): their environment, and
streaming their output.

Only what a tool needs to run is passed on: the private key ($SPARK_BACKUP_IDENTITY) and store
credentials live in the environment of spark-backup itself, and a child's environment can be
read from /proc by its owner and by root for as long as it runs.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import BinaryIO

from spark_backup.engine.streams import widen_pipe
from spark_backup.errors import SourceError

_PASSED_ON = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONPATH", "PYTHONHOME")


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
