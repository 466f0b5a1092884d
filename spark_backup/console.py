"""What the command line prints with: the two consoles, sizes, and text made safe for a
terminal. Shared by the core commands (``spark_backup/cli/``) and every kind's own commands.

rich loads on the first print, not on import: ``--help``, ``--version`` and ``wal-push``, which
PostgreSQL runs for every WAL segment, start without it."""

from __future__ import annotations

import datetime as dt
import re
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from spark_backup.errors import UsageError

if TYPE_CHECKING:
    from rich.console import Console


class _LazyConsole:
    """A rich ``Console`` made on first use; every attribute is the console's."""

    def __init__(self, to_stderr: bool):
        self._to_stderr = to_stderr
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            stream = sys.stderr if self._to_stderr else sys.stdout
            # Wide when piped, so tables and ids are not cut at 80 columns in logs.
            self._console = Console(stderr=self._to_stderr, width=None if stream.isatty() else 200)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


stdout = _LazyConsole(to_stderr=False)
stderr = _LazyConsole(to_stderr=True)


def printable(text: object) -> str:
    """``text`` safe to print through rich: control characters escaped (``engine.text``), and
    square brackets escaped so that a name like ``[red]x`` is shown, not taken as markup."""
    from rich.markup import escape

    from spark_backup.engine.text import printable as text_printable

    return escape(text_printable(text))


# What a cell of a column may not hold as is: control characters, and tabs (they would break
# the alignment). Columns are plain text, not rich markup: brackets stay as they are.
_CELL_UNSAFE_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def print_columns(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Rows as plain columns, aligned and two spaces apart, every cell made printable. Rich's
    Table took 6-12 s for 5,000 rows; this is linear and cheap per row (a row of plain ASCII,
    the usual case, is checked once and padded by ``len``), so ``list`` stays cheap as copies
    grow."""
    table = [_cells(row) for row in (headers, *rows)]
    widths = [max(width for _cell, width in column) for column in zip(*table, strict=True)]
    lines = (
        "  ".join(
            cell + " " * (width - cell_width)
            for (cell, cell_width), width in zip(row, widths, strict=True)
        ).rstrip()
        for row in table
    )
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    sys.stdout.flush()


def _cells(row: Sequence[object]) -> list[tuple[str, int]]:
    """Each cell of a row made printable, with its width in terminal columns."""
    texts = [str(value) for value in row]
    joined = "".join(texts)
    if joined.isascii() and not _CELL_UNSAFE_RE.search(joined):
        return [(text, len(text)) for text in texts]
    from spark_backup.engine.text import printable as text_printable

    cells = [text_printable(text).replace("\t", "\\x09") for text in texts]
    from rich.cells import cell_len

    return [(cell, cell_len(cell)) for cell in cells]


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
