"""What the command line prints with: the two consoles, sizes, and text made safe for a
terminal. Shared by the core commands (``spark_backup/cli/``) and every kind's own commands.

rich loads on the first print that needs it, not on import: ``--help``, ``--version`` and
``wal-push``, which PostgreSQL runs for every WAL segment, start without it, and a line of plain
text printed where rich would add nothing (no terminal, no markup; see ``_LazyConsole.print``)
is written without it, which spares ``backup``, ``verify`` and ``restore`` its 30 ms."""

from __future__ import annotations

import datetime as dt
import os
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
            self._console = Console(
                stderr=self._to_stderr, width=None if stream.isatty() else _PIPED_WIDTH
            )
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)

    @property
    def is_terminal(self) -> bool:
        """As rich's, without loading it where rich would only ask the stream."""
        if self._console is None and _rich_would_ask_isatty():
            tty = _isatty(self._stream())
            if tty is not None:
                return tty
        return self.console.is_terminal

    def print(self, *objects: Any, **options: Any) -> None:
        """As rich's ``print``; a single line of plain text to a stream that is no terminal is
        written as rich would write it (no colour, nothing to wrap, no markup nor emoji code
        to render: ``test_cli_startup`` compares the two), without loading rich."""
        stream = self._stream()
        if (
            self._console is None
            and len(objects) == 1
            and isinstance(objects[0], str)
            and (text := _without_style_tags(objects[0])) is not None
            and options.keys() <= {"highlight", "soft_wrap"}
            and _rich_would_ask_isatty()
            and _isatty(stream) is False
            and _renders_as_is(text, wrap_at=None if options.get("soft_wrap") else _PIPED_WIDTH)
        ):
            stream.write(text + "\n")
            stream.flush()
            return
        self.console.print(*objects, **options)

    def _stream(self) -> Any:
        return sys.stderr if self._to_stderr else sys.stdout


_PIPED_WIDTH = 200
# What rich would render rather than print as is: markup and escapes (a "["), emoji codes.
_RICH_SYNTAX_RE = re.compile(r"\[|:\S*?:")


def _rich_would_ask_isatty() -> bool:
    """Whether rich would take a stream for a terminal exactly when it is one: no variable
    forcing colour or terminal, no notebook, no IDLE (``rich.console.Console.is_terminal``)."""
    return (
        "FORCE_COLOR" not in os.environ
        and "TTY_COMPATIBLE" not in os.environ
        and "IPython" not in sys.modules
        and "idlelib" not in sys.modules
    )


def _isatty(stream: Any) -> bool | None:
    """``stream.isatty()``; None if it cannot tell (rich then decides)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return None


# The styles the commands mark words with (``[red]FAILED[/red]``): where there is no colour,
# rich prints the words alone.
_STYLE_TAG_RE = re.compile(r"\[(/?)(red|green)\]")


def _without_style_tags(text: str) -> str | None:
    """``text`` without its style tags, if they are those above, each closed in turn and none
    escaped (else None: rich renders it, or refuses it)."""
    if "[" not in text:
        return text
    if "\\" in text:
        return None
    opened: list[str] = []
    balanced = True

    def drop(tag: re.Match[str]) -> str:
        nonlocal balanced
        closing, style = tag.groups()
        if not closing:
            opened.append(style)
        elif not opened or opened.pop() != style:
            balanced = False
        return ""

    plain = _STYLE_TAG_RE.sub(drop, text)
    return plain if balanced and not opened else None


def _renders_as_is(text: str, wrap_at: int | None) -> bool:
    """Whether rich prints ``text`` unchanged: printable ASCII lines (no tab, no control
    character, one column per character) none longer than ``wrap_at``, nothing to render."""
    lines = text.split("\n")
    return (
        text.isascii()
        and all(line.isprintable() for line in lines)
        and (wrap_at is None or max(map(len, lines)) <= wrap_at)
        and not _RICH_SYNTAX_RE.search(text)
    )


stdout = _LazyConsole(to_stderr=False)
stderr = _LazyConsole(to_stderr=True)


def printable(text: object) -> str:
    """``text`` safe to print through rich: control characters escaped (``engine.text``), and
    square brackets escaped so that a name like ``[red]x`` is shown, not taken as markup."""
    from spark_backup.engine.text import printable as text_printable

    safe = text_printable(text)
    if "[" not in safe and not safe.endswith("\\"):
        return safe  # what rich's escape returns for it, without loading rich
    from rich.markup import escape

    return escape(safe)


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
