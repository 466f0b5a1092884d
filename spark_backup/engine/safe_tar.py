"""Extract a tar stream so that nothing is written outside the destination.

Two gates stand before every member:

- ``ArchiveGuard`` holds the archive to the shapes spark-backup writes: relative names without
  ``..``, hard links only to regular files extracted before them, and symlinks that resolve
  inside the destination when followed through the archive's own links, as the kernel would.
- tarfile's ``data`` filter: no absolute or outside paths, no device files, no setuid bits or
  group/other write permission, owners not restored.

Symlinks are created last, after every other member (GNU tar's "delayed links"): while files
and folders are written there is no link on disk that a write could go through, so the ``data``
filter's real-path checks see exactly what the kernel will use. That closes the symlink-chain
escapes (CVE-2025-4517 and relatives) which defeat tarfile's own checks before Python 3.11.13.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from spark_backup.engine.streams import Readable
from spark_backup.errors import RestoreRefused

# The kernel gives up after 40 links in one lookup; so does the guard.
MAX_LINK_HOPS = 40
# Deeper names are refused: publishing, the collision check and removal walk a tree one level
# per stack frame, and no configuration tree or data directory comes near this.
MAX_DEPTH = 256
# Linux's PATH_MAX: a longer name cannot be opened by path (counted without the staging folder).
MAX_NAME_BYTES = 4095
# Mode bits a restore never sets (tarfile's data filter and ours): setuid, setgid, sticky, and
# write permission for group and others.
STRIPPED_MODE_BITS = 0o7022
# How many of the members restored without such bits the summary names (it counts them all).
MAX_LISTED = 20


class UnsafeMember(tarfile.FilterError):
    def __init__(self, member: tarfile.TarInfo, reason: str):
        super().__init__(reason)
        self.tarinfo = member


@dataclass
class ExtractSummary:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)
    # Members whose setuid, setgid, sticky or group/other write bits were not restored:
    # "name (mode 4755)"; the first MAX_LISTED, and how many there were in all.
    modes_stripped: list[str] = field(default_factory=list)
    modes_stripped_count: int = 0

    def note_mode(self, name: str, member: tarfile.TarInfo) -> None:
        if member.mode & STRIPPED_MODE_BITS:
            self.modes_stripped_count += 1
            if len(self.modes_stripped) < MAX_LISTED:
                self.modes_stripped.append(f"{name} (mode {member.mode & 0o7777:o})")


class ArchiveGuard:
    """What the archive has extracted so far, and the rules a member must meet to join it."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.directories: dict[str, float] = {}  # name -> mtime, restored after the links
        self.links: dict[str, str] = {}  # name -> target, created at the end

    def member_name(self, member: tarfile.TarInfo) -> str:
        """The member's name as components joined by '/'; refuses what could leave the root."""
        name = member.name
        if name.startswith("/"):
            # tarfile would strip the slash; spark-backup never writes one, so refuse it.
            raise tarfile.AbsolutePathError(member)
        parts = [part for part in name.split("/") if part not in ("", ".")]
        if not parts or ".." in parts:
            raise UnsafeMember(member, "its name contains '..' or is empty")
        if len(parts) > MAX_DEPTH:
            raise UnsafeMember(member, f"it is nested deeper than {MAX_DEPTH} folders")
        normal = "/".join(parts)
        if len(os.fsencode(normal)) > MAX_NAME_BYTES:
            raise UnsafeMember(member, f"its name is longer than {MAX_NAME_BYTES} bytes")
        through = self._link_prefix(parts)
        if through:
            raise UnsafeMember(member, f"it goes through the archive's link {_short(through)!r}")
        return normal

    def admit_hardlink(self, member: tarfile.TarInfo) -> None:
        target = member.linkname
        parts = [part for part in target.split("/") if part not in ("", ".")]
        if target.startswith("/") or ".." in parts or "/".join(parts) not in self.files:
            raise UnsafeMember(
                member,
                f"it is a hard link to {_short(target)!r}, not to a file extracted before it",
            )

    def check_link(self, name: str, member: tarfile.TarInfo, destination: Path) -> None:
        """A symlink, judged when all members are known: nothing else may sit where it goes,
        and its target must resolve inside the destination through the archive's links."""
        through = self._link_prefix(name.split("/")[:-1])
        if through:
            raise UnsafeMember(member, f"it goes through the archive's link {_short(through)!r}")
        if os.path.lexists(destination / name):
            raise UnsafeMember(member, "it would replace a file or folder of the archive")
        if member.linkname.startswith("/"):
            raise tarfile.AbsoluteLinkError(member)
        if self._resolve(name.split("/")[:-1], member.linkname, 0) is None:
            raise UnsafeMember(
                member, f"its target {_short(member.linkname)!r} leads outside the destination"
            )

    def _link_prefix(self, parts: list[str]) -> str | None:
        for end in range(1, len(parts) + 1):
            prefix = "/".join(parts[:end])
            if prefix in self.links:
                return prefix
        return None

    def _resolve(self, base: list[str], target: str, hops: int) -> list[str] | None:
        """Walk ``target`` from folder ``base`` as the kernel would, following the archive's
        links; None when it climbs above the destination or loops."""
        if hops > MAX_LINK_HOPS or target.startswith("/"):
            return None
        parts = list(base)
        for component in target.split("/"):
            if component in ("", "."):
                continue
            if component == "..":
                if not parts:
                    return None
                parts.pop()
                continue
            parts.append(component)
            followed = self.links.get("/".join(parts))
            if followed is not None:
                resolved = self._resolve(parts[:-1], followed, hops + 1)
                if resolved is None:
                    return None
                parts = resolved
        return parts


def extract_tar(plain: Readable, destination: Path, skip_unsafe: bool = False) -> ExtractSummary:
    """Extract a tar stream into an empty ``destination``.

    An unsafe member refuses the whole extraction (``RestoreRefused``), or with ``skip_unsafe``
    is left out and listed in the summary, so that for instance an absolute ``/etc/localtime``
    link can be recreated by hand.
    """
    guard = ArchiveGuard()
    summary = ExtractSummary()
    deferred: list[tuple[str, tarfile.TarInfo]] = []

    def refuse(member: tarfile.TarInfo, error: tarfile.FilterError) -> None:
        if not skip_unsafe:
            raise RestoreRefused(
                f"refusing unsafe archive member {_short(member.name)!r}: {_short(str(error), 300)} "
                "(--skip-unsafe leaves it out)"
            ) from None
        summary.skipped.append(f"{member.name}: {error}")

    def admit(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        try:
            name = guard.member_name(member)
            if member.issym():
                guard.links[name] = member.linkname
                deferred.append((name, member))
                return None
            if member.islnk():
                guard.admit_hardlink(member)
            checked = tarfile.data_filter(member, dest)
        except tarfile.FilterError as error:
            refuse(member, error)
            return None
        if checked.isreg() or checked.islnk():
            guard.files.add(name)
        summary.note_mode(name, member)
        if checked.isreg():
            summary.files += 1
            summary.bytes += checked.size
        elif checked.isdir():
            summary.directories += 1
            guard.directories[name] = checked.mtime
        return checked

    try:
        with tarfile.open(fileobj=plain, mode="r|") as archive:
            archive.extractall(destination, filter=admit)
        for name, member in deferred:
            try:
                guard.check_link(name, member, destination)
                checked = tarfile.data_filter(member, str(destination))
            except tarfile.FilterError as error:
                refuse(member, error)
                del guard.links[name]
                continue
            _make_link(destination, name, checked)
            summary.symlinks += 1
        _restore_folder_times(destination, guard, deferred)
    except tarfile.ReadError as exc:
        raise RestoreRefused(f"copy is not a readable tar archive: {exc}") from None
    except (tarfile.TarError, KeyError) as exc:
        raise RestoreRefused(f"copy is not an archive spark-backup can restore: {exc}") from None
    except OSError as exc:
        raise RestoreRefused(
            f"restore failed while writing {exc.filename or destination}: {exc.strerror} "
            "(nothing was published)"
        ) from None
    return summary


def _make_link(destination: Path, name: str, member: tarfile.TarInfo) -> None:
    path = destination / name
    path.parent.mkdir(parents=True, exist_ok=True)  # no component is a link (checked)
    os.symlink(member.linkname, path)
    os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)


def _restore_folder_times(
    destination: Path, guard: ArchiveGuard, deferred: list[tuple[str, tarfile.TarInfo]]
) -> None:
    """Creating the links touched their folders' mtimes; put back the archive's."""
    for name, _member in deferred:
        folder = posixpath.dirname(name)
        if folder in guard.directories:
            mtime = guard.directories[folder]
            os.utime(destination / folder, (mtime, mtime), follow_symlinks=False)


def count_members(plain: Readable) -> ExtractSummary:
    """Count an archive's members without extracting anything."""
    summary = ExtractSummary()
    with tarfile.open(fileobj=plain, mode="r|") as archive:
        for member in archive:
            if member.isreg():
                summary.files += 1
                summary.bytes += member.size
            elif member.isdir():
                summary.directories += 1
            elif member.issym():
                summary.symlinks += 1
    return summary


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
