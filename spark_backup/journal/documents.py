"""Updating the documents people keep beside the journal, touching nothing else in them:

- the task overview CSV: one row's status, date and evidence, found by its id (created if
  missing); every other row keeps its bytes, and the file keeps its delimiter, quoting, line
  endings, encoding and byte-order mark;
- the Definition of Done: one checklist item ticked with the drill's time; every other line
  keeps its bytes.

A file that cannot be read as expected raises ``JournalError`` naming it, and is left as it was.
Files are replaced atomically, keeping their mode.
"""

from __future__ import annotations

import csv
import io
import os
import re
import tempfile
from pathlib import Path

from spark_backup.errors import SparkBackupError
from spark_backup.journal.settings import TaskColumns

# Tried in this order: UTF-8 (with or without BOM), then Windows' Western European code page,
# which is what a spreadsheet saves a German CSV as.
ENCODINGS = ("utf-8", "cp1252")


class JournalError(SparkBackupError):
    """A journal document is malformed; it was left unchanged."""

    exit_code = 2


def _replace(path: Path, data: bytes) -> None:
    mode = path.stat().st_mode & 0o7777
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _decode(path: Path, raw: bytes) -> tuple[str, str, bytes]:
    """The text, its encoding and its byte-order mark."""
    bom = b"\xef\xbb\xbf" if raw.startswith(b"\xef\xbb\xbf") else b""
    for encoding in ENCODINGS:
        try:
            return raw[len(bom) :].decode(encoding), encoding, bom
        except UnicodeDecodeError:
            continue
    raise JournalError(f"{path}: neither UTF-8 nor Windows-1252 text; left unchanged")


def _line_ending(text: str) -> str:
    return "\r\n" if "\r\n" in text else "\n"


def update_task_row(
    path: Path, columns: TaskColumns, task_id: str, values: dict[str, str], title: str
) -> str:
    """Set the row ``task_id``'s status, date and evidence (``values`` by column role); return
    ``updated`` or ``created``."""
    raw = path.read_bytes()
    text, encoding, bom = _decode(path, raw)
    newline = _line_ending(text)
    try:
        dialect = csv.Sniffer().sniff(text.split(newline, 1)[0] + newline, delimiters=",;\t|")
    except csv.Error:
        raise JournalError(f"{path}: no delimiter found in the header; left unchanged") from None
    lines = text.splitlines(keepends=True)
    reader = csv.reader(io.StringIO(text, newline=""), dialect)
    records: list[tuple[list[str], int, int]] = []  # fields, first line, end line
    start = 0
    try:
        for fields in reader:
            records.append((fields, start, reader.line_num))
            start = reader.line_num
    except csv.Error as exc:
        raise JournalError(f"{path}: line {reader.line_num}: {exc}; left unchanged") from None
    if not records:
        raise JournalError(f"{path}: no header row; left unchanged")
    header = records[0][0]
    wanted = {
        "id": columns.id,
        "status": columns.status,
        "date": columns.date,
        "evidence": columns.evidence,
    }
    missing = [name for name in wanted.values() if name not in header]
    if missing:
        raise JournalError(
            f"{path}: header has no column {', '.join(map(repr, missing))} "
            f"(it has: {', '.join(header)}); left unchanged"
        )
    index = {role: header.index(name) for role, name in wanted.items()}
    for number, (fields, _, _) in enumerate(records[1:], start=2):
        if fields and len(fields) != len(header):
            raise JournalError(
                f"{path}: row {number} has {len(fields)} fields, the header {len(header)}; "
                "left unchanged"
            )
    # Quote every field if the file does (its header tells), else only where needed.
    quote_all = bool(lines) and lines[0].lstrip().startswith(dialect.quotechar or '"')

    def render(fields: list[str]) -> str:
        out = io.StringIO()
        csv.writer(
            out,
            delimiter=dialect.delimiter,
            quotechar=dialect.quotechar or '"',
            quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL,
            lineterminator=newline,
        ).writerow(fields)
        return out.getvalue()

    matches = [r for r in records[1:] if r[0] and r[0][index["id"]] == task_id]
    if len(matches) > 1:
        raise JournalError(f"{path}: task {task_id!r} appears {len(matches)} times; left unchanged")
    if matches:
        fields, first, end = matches[0]
        fields = list(fields)
        for role, value in values.items():
            fields[index[role]] = value
        lines[first:end] = [render(fields)]
        action = "updated"
    else:
        fields = [""] * len(header)
        fields[index["id"]] = task_id
        for role, value in values.items():
            fields[index[role]] = value
        # The title goes into the first column that is none of the four, if there is one.
        free = [i for i in range(len(header)) if i not in index.values()]
        if free:
            fields[free[0]] = title
        if lines and not lines[-1].endswith(("\n", "\r")):
            lines[-1] += newline
        lines.append(render(fields))
        action = "created"
    _replace(path, bom + "".join(lines).encode(encoding))
    return action


_CHECKBOX = re.compile(r"^(?P<indent>\s*[-*+] \[)(?P<mark>[ xX])(?P<rest>\] .*?)(?P<eol>\r?\n?)$")
# What a previous tick appended; replaced, not repeated, by the next.
_STAMP = re.compile(r" \(Restore-Drill bestanden: [^)]*\)$")


def tick_definition_of_done(path: Path, item: str, stamp: str) -> str:
    """Tick the one checklist item containing ``item`` and stamp it with the drill's time;
    return the new line."""
    raw = path.read_bytes()
    text, encoding, bom = _decode(path, raw)
    lines = text.splitlines(keepends=True)
    found = [
        (number, match)
        for number, line in enumerate(lines)
        if (match := _CHECKBOX.match(line)) and item in match["rest"]
    ]
    if not found:
        raise JournalError(f"{path}: no checklist item '- [ ] ...{item}...' found; left unchanged")
    if len(found) > 1:
        raise JournalError(
            f"{path}: {len(found)} checklist items mention {item!r} (lines "
            f"{', '.join(str(n + 1) for n, _ in found)}); left unchanged"
        )
    number, match = found[0]
    rest = _STAMP.sub("", match["rest"])
    lines[number] = f"{match['indent']}x{rest} (Restore-Drill bestanden: {stamp}){match['eol']}"
    _replace(path, bom + "".join(lines).encode(encoding))
    return lines[number].rstrip("\r\n")
