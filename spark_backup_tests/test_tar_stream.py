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
from spark_backup.engine.tar_stream import TarFormatError, TarReader
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
