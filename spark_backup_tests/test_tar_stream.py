"""The extraction loop restores what tarfile's ``data`` filter restores, member for member, on
every tar format a copy may hold; and refuses what is not a tar archive."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from spark_backup.engine.safe_tar import count_members, extract_tar
from spark_backup.engine.streams import ChunkReader
from spark_backup.engine.tar_stream import RECORD, TarFormatError, TarReader, TarWriter
from spark_backup.errors import RestoreRefused


def _entry(archive: tarfile.TarFile, name: str, kind=tarfile.REGTYPE, **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    data = attrs.pop("data", b"")
    for key, value in attrs.items():
        setattr(info, key, value)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _shapes(archive: tarfile.TarFile) -> None:
    long_folder = "long/" + "/".join(f"{'segment' * 6}{i}" for i in range(6))  # > 255 bytes
    _entry(archive, "etc", tarfile.DIRTYPE, mode=0o750, mtime=1_600_000_000)
    _entry(archive, "etc/plain.conf", data=b"a = 1\n", mode=0o644, mtime=1_700_000_000)
    _entry(archive, "etc/private.key", data=b"k" * 5000, mode=0o600, mtime=1_700_000_001)
    _entry(archive, "etc/run.sh", data=b"#!/bin/sh\n", mode=0o4775, mtime=1_700_000_002)
    _entry(archive, "etc/noexec", data=b"x", mode=0o511, mtime=1_700_000_003)
    _entry(archive, "etc/empty", data=b"", mode=0o644, mtime=1_700_000_004)
    _entry(archive, "etc/big.bin", data=os.urandom(3 << 20), mode=0o644, mtime=1_700_000_005)
    _entry(archive, f"{long_folder}/{'n' * 120}.yaml", data=b"long", mtime=1_700_000_006)
    _entry(archive, "etc/ünïcødé ✓.conf", data=b"u", mtime=1_700_000_007)
    _entry(archive, "etc/hard", tarfile.LNKTYPE, linkname="etc/plain.conf", mode=0o644)
    _entry(archive, "etc/current", tarfile.SYMTYPE, linkname="plain.conf", mtime=1_700_000_008)
    _entry(archive, "implied/parent/file", data=b"p", mtime=1_700_000_009)
    _entry(archive, "etc/sub/", tarfile.DIRTYPE, mtime=1_600_000_001)


def _tree(root: Path) -> dict[str, tuple]:
    found = {}
    for directory, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(directory, name)
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                # tarfile sets a link's time on its target (it follows the link); safe_tar
                # gives the link its own, as GNU tar does.
                found[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                # Folders the archive only implies get the time of the restore.
                mtime = st.st_mtime if st.st_mtime < 1_700_000_000 else "now"
                found[str(path.relative_to(root))] = ("dir", stat.S_IMODE(st.st_mode), mtime)
            else:
                found[str(path.relative_to(root))] = (
                    "file",
                    stat.S_IMODE(st.st_mode),
                    int(st.st_mtime) if path.name != "file" else "implied",
                    path.read_bytes(),
                    st.st_nlink,
                )
    return found


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_extraction_matches_tarfiles_data_filter(tmp_path: Path, fmt: int) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        if fmt == tarfile.USTAR_FORMAT:  # ustar holds names up to 255 bytes, split in two
            _entry(archive, "a" * 90 + "/" + "b" * 90 + "/c.conf", data=b"split", mtime=7)
            _entry(archive, "etc/plain.conf", data=b"a = 1\n", mode=0o640, mtime=8)
            _entry(archive, "etc/hard", tarfile.LNKTYPE, linkname="etc/plain.conf", mode=0o640)
        else:
            _shapes(archive)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    buffer.seek(0)
    summary = extract_tar(buffer, ours)
    buffer.seek(0)
    with tarfile.open(fileobj=buffer, mode="r|") as archive:
        archive.extractall(theirs, filter="data")
    assert _tree(ours) == _tree(theirs)
    if fmt != tarfile.USTAR_FORMAT:
        assert (ours / "etc/current").lstat().st_mtime == 1_700_000_008
    buffer.seek(0)
    counted = count_members(buffer)
    assert (counted.files, counted.symlinks) == (summary.files, summary.symlinks)


def test_extraction_restores_what_gnu_tar_writes(tmp_path: Path) -> None:
    """The archive a backup makes: GNU tar, pax, mtimes in the ustar header."""
    source = tmp_path / "src"
    (source / "d" / ("x" * 150)).mkdir(parents=True)
    (source / "d" / ("x" * 150) / ("y" * 200)).write_text("deep")
    (source / "d" / "l").symlink_to("x" * 150)
    os.link(source / "d" / ("x" * 150) / ("y" * 200), source / "d" / "h")
    archive = subprocess.run(
        ["tar", "-c", "--format=pax", "--pax-option=delete=atime,delete=ctime,delete=mtime",
         "-C", str(source), "d"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    extract_tar(io.BytesIO(archive), ours)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r|") as tar:
        tar.extractall(theirs, filter="data")
    assert _tree(ours) == _tree(theirs)
    assert (ours / "d" / "l" / ("y" * 200)).read_text() == "deep"


def test_a_hard_link_is_not_written_through_by_a_later_member(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        _entry(archive, "f", data=b"one")
        _entry(archive, "h", tarfile.LNKTYPE, linkname="f")
        _entry(archive, "f", data=b"two")
    buffer.seek(0)
    extract_tar(buffer, tmp_path)
    assert (tmp_path / "f").read_bytes() == b"two" and (tmp_path / "h").read_bytes() == b"one"


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda a: (_entry(a, "f", data=b"x"), _entry(a, "f/g", data=b"y")), "is a file of"),
        (lambda a: (_entry(a, "d/g", data=b"y"), _entry(a, "d", data=b"x")), "replace a folder"),
        (lambda a: (_entry(a, "f", data=b"x"), _entry(a, "f", tarfile.DIRTYPE)), "replace a file"),
        (lambda a: _entry(a, "fifo", tarfile.FIFOTYPE), "special file"),
    ],
)
def test_a_member_never_replaces_another_of_another_type(tmp_path: Path, build, reason) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        build(archive)
    buffer.seek(0)
    with pytest.raises(RestoreRefused, match=reason):
        extract_tar(buffer, tmp_path)


def test_what_is_not_a_tar_archive_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        _entry(archive, "f", data=b"x" * 2000)
    data = buffer.getvalue()
    damaged = data[:10] + b"Z" + data[11:]
    with pytest.raises(TarFormatError, match="bad checksum"):
        list(TarReader(io.BytesIO(damaged)))
    with pytest.raises(RestoreRefused, match="not a readable tar archive: unexpected end of data"):
        extract_tar(io.BytesIO(data[:1024]), tmp_path)
    assert list(TarReader(io.BytesIO(b""))) == []


def test_what_the_writer_streams_the_reader_extracts_and_tar_reads(tmp_path: Path) -> None:
    """TarWriter's archive (pax headers, any name and size) reads back with TarReader, through
    ``extract_tar``, and with GNU tar; it ends on a whole record as tar's own do."""
    members = {
        "db/ünïcødé ✓.bson": os.urandom(3 << 20),
        f"db/{'n' * 150}.metadata.json": b"{}",
        "db/empty.bson": b"",
    }
    writer = TarWriter()

    def chunks():
        yield from writer.directory("db")
        for name, data in members.items():
            yield from writer.file(name, len(data), io.BytesIO(data))
        yield from writer.end()

    archive = ChunkReader(chunks()).read()
    assert len(archive) == writer.written and len(archive) % RECORD == 0
    assert [(m.name, m.size) for m in TarReader(io.BytesIO(archive))] == [
        ("db/", 0),
        *((name, len(data)) for name, data in members.items()),
    ]
    (tmp_path / "ours").mkdir()
    extract_tar(io.BytesIO(archive), tmp_path / "ours")
    for name, data in members.items():
        assert (tmp_path / "ours" / name).read_bytes() == data
    (tmp_path / "gnu").mkdir()
    subprocess.run(["tar", "-xf", "-", "-C", str(tmp_path / "gnu")], input=archive, check=True)
    assert (tmp_path / "gnu" / "db/ünïcødé ✓.bson").read_bytes() == members["db/ünïcødé ✓.bson"]


def test_a_member_cut_short_fails_the_archive_instead_of_padding_it() -> None:
    with pytest.raises(OSError, match="ended 6 bytes early"):
        list(TarWriter().file("short", 10, io.BytesIO(b"four")))


def test_chunk_reader_gathers_small_chunks_and_passes_on_a_producers_error() -> None:
    pieces = [b"ab", b"", b"cde", b"fghij"]
    reader = ChunkReader(pieces)
    assert [reader.read(4), reader.read(4), reader.read(4), reader.read(4)] == [
        b"abcd",
        b"efgh",
        b"ij",
        b"",
    ]
    whole = b"x" * 10
    assert ChunkReader([whole]).read(10) is whole  # a chunk of the size asked: not copied
    handed_out = [b"1", b"23", None, b"never"]
    # a function that hands out chunks, None at the end (the overlapped encryption's queue)
    assert ChunkReader(iter(lambda: handed_out.pop(0), None)).read() == b"123"

    def failing():
        yield b"partial"
        raise OSError("source went away")

    reader = ChunkReader(failing())
    assert reader.read(3) == b"par"
    with pytest.raises(OSError, match="source went away"):
        reader.read(100)


def test_member_data_streams_in_any_read_size_and_what_is_left_is_skipped() -> None:
    big, small = os.urandom((1 << 20) + 777), b"tail"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        _entry(archive, "big", data=big)
        _entry(archive, "half-read", data=big)
        _entry(archive, "small", data=small)
    buffer.seek(0)
    reader = TarReader(buffer)
    got = {}
    for member in reader:
        stream = reader.open(member)
        if member.name == "half-read":
            got[member.name] = stream.read(1000)
            continue
        parts = []
        while part := stream.read(4093):  # reads that straddle the reader's buffer
            assert len(part) <= 4093
            parts.append(part)
        got[member.name] = b"".join(parts)
    assert got == {"big": big, "half-read": big[:1000], "small": small}
    with pytest.raises(TarFormatError, match="unexpected end of data"):
        cut = TarReader(io.BytesIO(buffer.getvalue()[:5000]))
        for member in cut:
            cut.open(member).read()
