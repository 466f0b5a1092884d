"""Tar streams member by member, both ways: ``TarReader`` parses headers and hands data
straight to a file (or as a stream: ``open``); ``TarWriter`` yields an archive for sources that
produce files as they go.

Reads the formats spark-backup's copies hold (GNU tar's pax archives, pg_basebackup's ustar):
ustar headers with their name prefix, pax extended headers (local and global: ``path``,
``linkpath``, ``size``, ``mtime``), GNU long names and links (``L``, ``K``), base-256 numbers.
Every header's checksum is checked. Member data is never held beyond one read buffer.

Python's ``tarfile`` does the same at about twenty times the cost per member (its header
objects, and its extraction filter's real-path checks); ``safe_tar`` extracts with this reader
and keeps its own table of what it created instead. Writing uses ``tarfile``'s header
encoder (pax, so any name and size fit); the result reads with GNU tar and ``tarfile`` alike.
"""

from __future__ import annotations

import os
import tarfile
import time
from collections.abc import Iterator
from zlib import adler32

from spark_backup.engine.streams import CHUNK_SIZE, Readable

BLOCK = 512
RECORD = 20 * BLOCK  # tar pads an archive to whole records
_ZERO_BLOCK = bytes(BLOCK)
# An extended header (pax, GNU long name) larger than this is refused: it would be held whole.
MAX_EXTENDED_HEADER = 1 << 20

REGULAR = (b"0", b"\0", b"7")  # regular file, old regular file, contiguous file
HARDLINK = b"1"
SYMLINK = b"2"
DIRECTORY = b"5"
_PAX_LOCAL, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK = b"x", b"g", b"L", b"K"
_GNU_TYPES = (_GNU_LONGNAME, _GNU_LONGLINK, b"S")
_ENDS = (0, 32)  # NUL and space end a numeric field
# Members whose size field does not count data in the stream (as tarfile reads them): links,
# folders, FIFOs and devices. Every other type, unknown ones included, is followed by its data.
_NO_DATA = (HARDLINK, SYMLINK, DIRECTORY, b"3", b"4", b"6")


class TarFormatError(ValueError):
    """The stream is not a tar archive this reader can follow (bad checksum, cut short)."""


class Member:
    """One archive member; ``unsupported`` says why it cannot be extracted, if it cannot."""

    __slots__ = ("linkname", "mode", "mtime", "name", "size", "type", "unsupported")

    def __init__(self, name, type_, mode, size, mtime, linkname, unsupported=""):
        self.name: str = name
        self.type: bytes = type_
        self.mode: int = mode
        self.size: int = size
        self.mtime: float = mtime
        self.linkname: str = linkname
        self.unsupported: str = unsupported

    def isreg(self) -> bool:
        return self.type in REGULAR

    def isdir(self) -> bool:
        return self.type == DIRECTORY

    def issym(self) -> bool:
        return self.type == SYMLINK

    def islnk(self) -> bool:
        return self.type == HARDLINK

    def stored_size(self) -> int:
        """Bytes of data in the stream (links, folders and devices have none, whatever their
        size field says)."""
        return 0 if self.type in _NO_DATA else self.size


class TarReader:
    """Iterate over members; before asking for the next one, a caller may copy the current
    member's data (``copy_to``); whatever it leaves is skipped."""

    def __init__(self, source: Readable):
        self._source = source
        self._buf = b""
        self._pos = 0
        self._unread = 0  # data (and padding) of the current member not consumed yet
        self._globals: dict[str, bytes] = {}

    # --- buffer -----------------------------------------------------------------------------

    def _ensure(self, count: int) -> bool:
        """At least ``count`` bytes buffered from the current position; False at the end."""
        available = len(self._buf) - self._pos
        if available >= count:
            return True
        parts = [self._buf[self._pos :]] if available else []
        while available < count:
            chunk = self._source.read(max(CHUNK_SIZE, count - available))
            if not chunk:
                break
            parts.append(chunk)
            available += len(chunk)
        # One part (a header at the start of a read, the usual case) is taken as it is: joining
        # would copy the whole MiB.
        self._buf = parts[0] if len(parts) == 1 else b"".join(parts)
        self._pos = 0
        return available >= count

    def _take(self, count: int) -> bytes:
        if not self._ensure(count):
            raise TarFormatError("unexpected end of data")
        data = self._buf[self._pos : self._pos + count]
        self._pos += count
        return data

    def _pass(self, count: int, fd: int | None) -> None:
        """Consume ``count`` bytes, writing them to ``fd`` unless it is None."""
        while count:
            available = len(self._buf) - self._pos
            if not available:
                self._buf = self._source.read(CHUNK_SIZE)
                self._pos = 0
                available = len(self._buf)
                if not available:
                    raise TarFormatError("unexpected end of data")
            step = min(available, count)
            if fd is not None:
                _write_all(fd, memoryview(self._buf)[self._pos : self._pos + step])
            self._pos += step
            count -= step

    # --- members ------------------------------------------------------------------------------

    def copy_to(self, member: Member, fd: int) -> None:
        """Write the current member's data to ``fd``."""
        size = member.stored_size()
        pos = self._pos
        if len(self._buf) - pos >= size:  # the common case: all of it in the buffer
            _write_all(fd, memoryview(self._buf)[pos : pos + size])
            self._pos = pos + size
        else:
            self._pass(size, fd)
        self._unread -= size

    def open(self, member: Member) -> Readable:
        """The current member's data as a stream, to be read before asking for the next member
        (what it leaves is skipped); a read may return less than asked, never past the member."""
        return _MemberData(self, member.stored_size())

    def _read_data(self, count: int) -> bytes:
        """1 to ``count`` bytes of the current member's data, from the buffer while it lasts."""
        if len(self._buf) == self._pos:
            self._buf = self._source.read(CHUNK_SIZE)
            self._pos = 0
            if not self._buf:
                raise TarFormatError("unexpected end of data")
        data = self._buf[self._pos : self._pos + count]
        self._pos += len(data)
        self._unread -= len(data)
        return data

    def __iter__(self) -> Iterator[Member]:
        while True:
            if self._unread:
                if len(self._buf) - self._pos >= self._unread:
                    self._pos += self._unread
                else:
                    self._pass(self._unread, None)
                self._unread = 0
            member = self._next_member()
            if member is None:
                return
            stored = member.stored_size()
            self._unread = stored + (-stored % BLOCK)
            yield member

    def _next_member(self) -> Member | None:
        local: dict[str, bytes] = {}
        long_name = long_link = None
        while True:
            pos = self._pos
            if len(self._buf) - pos >= BLOCK:
                header = self._buf[pos : pos + BLOCK]
                self._pos = pos + BLOCK
            elif self._ensure(BLOCK):
                header = self._take(BLOCK)
            else:
                if len(self._buf) - self._pos:
                    raise TarFormatError("unexpected end of data")
                return None  # no end-of-archive blocks: tarfile accepts that too
            if header == _ZERO_BLOCK:
                return None
            # Numbers as GNU tar writes them (zero-padded octal and a NUL) parse at once; the
            # rest (spaces, base-256) take the general way.
            try:
                if header[135] not in _ENDS:
                    raise ValueError  # twelve digits: all of them count
                recorded = int(header[148:154], 8)
                size = int(header[124:135], 8)
            except ValueError:
                recorded = _number(header[148:156])
                size = _number(header[124:136])
            # The header's byte sum, taken from zlib's adler32 (whose low half is 1 + the sum
            # modulo 65521) at a fiftieth of the cost of sum(); a mismatch gets the exact check.
            if (recorded - 256 + sum(header[148:156]) + 1) % 65521 != adler32(header) & 0xFFFF:
                _check_sum(header)
            type_ = header[156:157]
            if type_ in (_PAX_LOCAL, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK):
                if size > MAX_EXTENDED_HEADER:
                    raise TarFormatError(f"extended header of {size} bytes")
                data = self._take(size)
                self._take(-size % BLOCK)
                if type_ == _PAX_LOCAL:
                    local.update(_pax_fields(data))
                elif type_ == _PAX_GLOBAL:
                    self._globals.update(_pax_fields(data))
                elif type_ == _GNU_LONGNAME:
                    long_name = data.split(b"\0", 1)[0]
                else:
                    long_link = data.split(b"\0", 1)[0]
                continue
            return self._member(header, type_, size, local, long_name, long_link)

    def _member(
        self,
        header: bytes,
        type_: bytes,
        size: int,
        local: dict[str, bytes],
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> Member:
        end = header.find(b"\0", 0, 100)
        name = header[: end if end >= 0 else 100]
        if header[345] and type_ not in _GNU_TYPES and header[257:263] == b"ustar\0":
            end = header.find(b"\0", 345, 500)
            name = header[345 : end if end >= 0 else 500] + b"/" + name
        if long_name is not None:
            name = long_name
        if long_link is not None:
            linkname = long_link
        elif header[157]:
            end = header.find(b"\0", 157, 257)
            linkname = header[157 : end if end >= 0 else 257]
        else:
            linkname = b""
        try:
            if header[107] not in _ENDS or header[147] not in _ENDS:
                raise ValueError
            mode = int(header[100:107], 8)
            mtime: float = int(header[136:147], 8)
        except ValueError:
            mode = _number(header[100:108])
            mtime = _number(header[136:148])
        unsupported = ""
        fields = {**self._globals, **local} if self._globals else local
        if fields:
            if "path" in fields:
                name = fields["path"]
            if "linkpath" in fields:
                linkname = fields["linkpath"]
            try:
                if "size" in fields:
                    size = int(fields["size"])
                if "mtime" in fields:
                    mtime = float(fields["mtime"])
            except ValueError:
                raise TarFormatError("malformed pax size or mtime") from None
            if any(key.startswith("GNU.sparse.") for key in fields):
                unsupported = "it is a sparse file, which spark-backup does not restore"
        if type_ == b"\0" and name.endswith(b"/"):
            type_ = DIRECTORY  # the old format's folders
        if type_ == b"S":
            unsupported = "it is a sparse file, which spark-backup does not restore"
        return Member(
            name.decode("utf-8", "surrogateescape"),
            type_,
            mode,
            size,
            mtime,
            linkname.decode("utf-8", "surrogateescape") if linkname else "",
            unsupported,
        )


class _MemberData:
    def __init__(self, reader: TarReader, size: int):
        self._reader = reader
        self._left = size

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            return b"".join(iter(lambda: self.read(CHUNK_SIZE), b""))
        count = min(size, self._left)
        if not count:
            return b""
        data = self._reader._read_data(count)
        self._left -= len(data)
        return data

    def readable(self) -> bool:
        return True


class TarWriter:
    """Yields the bytes of a tar archive member by member; ``written`` counts them, for the
    closing padding."""

    def __init__(self) -> None:
        self.written = 0
        self.mtime = int(time.time())

    def _emit(self, data: bytes) -> bytes:
        self.written += len(data)
        return data

    def _header(self, info: tarfile.TarInfo) -> bytes:
        return self._emit(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def directory(self, name: str) -> Iterator[bytes]:
        info = tarfile.TarInfo(name.rstrip("/") + "/")
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o700, self.mtime
        yield self._header(info)

    def file(self, name: str, size: int, content: Readable) -> Iterator[bytes]:
        """A regular file of exactly ``size`` bytes read from ``content``."""
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o600, self.mtime
        yield self._header(info)
        remaining = size
        while remaining:
            chunk = content.read(min(CHUNK_SIZE, remaining))
            if not chunk:
                raise OSError(f"{name} ended {remaining} bytes early")
            remaining -= len(chunk)
            yield self._emit(chunk)
        if size % BLOCK:
            yield self._emit(bytes(BLOCK - size % BLOCK))

    def end(self) -> Iterator[bytes]:
        """Two zero blocks, then zeros up to a whole record, as tar itself ends an archive."""
        yield self._emit(bytes(2 * BLOCK))
        if self.written % RECORD:
            yield self._emit(bytes(RECORD - self.written % RECORD))


def _check_sum(header: bytes) -> None:
    recorded = _number(header[148:156])
    unsigned = 256 + sum(header) - sum(header[148:156])
    if recorded != unsigned:
        signed = 256 + sum(b - 256 if b > 127 else b for b in header[:148] + header[156:])
        if recorded != signed:
            raise TarFormatError("bad checksum")


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU's base-256 for large values."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[0] == 0xFF else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError("invalid header") from None


def _pax_fields(data: bytes) -> dict[str, bytes]:
    """``"%d %s=%s\\n"`` records: length, key, value."""
    fields: dict[str, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError("malformed pax header") from None
        end = pos + length
        if space < 0 or length < 5 or end > len(data) or data[end - 1 : end] != b"\n":
            raise TarFormatError("malformed pax header")
        key, equals, value = data[space + 1 : end - 1].partition(b"=")
        if not equals:
            raise TarFormatError("malformed pax header")
        fields[key.decode("utf-8", "surrogateescape")] = value
        pos = end
    return fields


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]
