"""What the command line prints with: the two consoles, sizes, and text made safe for a
terminal. Shared by the core commands (``spark_backup/cli/``) and every kind's own commands."""

from __future__ import annotations

import datetime as dt
import sys

from rich.console import Console
from rich.markup import escape

from spark_backup.engine.text import printable as text_printable
from spark_backup.errors import UsageError

# Wide when piped, so tables and ids are not cut at 80 columns in logs.
stdout = Console(width=None if sys.stdout.isatty() else 200)
stderr = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def printable(text: object) -> str:
    """``text`` safe to print through rich: control characters escaped (``engine.text``), and
    square brackets escaped so that a name like ``[red]x`` is shown, not taken as markup."""
    return escape(text_printable(text))


def size(value: int) -> str:
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} TiB"


def error_line(message: object) -> None:
    stderr.print(f"[red]error:[/red] {printable(message)}", highlight=False, soft_wrap=True)


def parse_time(text: str, option: str = "--to-time") -> dt.datetime:
    """An ISO 8601 time; without a zone it is UTC."""
    try:
        value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"{option} {text!r} is not an ISO 8601 time (e.g. 2026-11-27T09:30:00Z)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
