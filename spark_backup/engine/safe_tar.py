"""Extract a tar stream so that nothing is written outside the destination.

The extraction keeps its own table of what it has created (``ArchiveGuard``: folders, files,
links to come) and judges every member against that table, by its name alone:

- names are relative, without ``..``, at most ``MAX_DEPTH`` deep and ``MAX_NAME_BYTES`` long;
  nothing may sit below a file or a link of the archive, nor replace a folder with a file;
- hard links only to regular files extracted before them;
- symlinks are created last, after every other member (GNU tar's "delayed links"), and only
  if they resolve inside the destination when followed through the archive's own links, as
  the kernel would; none may replace a member or lie below another link;
- no device files, FIFOs or other special members; no setuid, setgid or sticky bit, nor
  group/other write permission; owners are not restored (tarfile's ``data`` filter rules).

Why no real-path checks are needed: every write is relative to a descriptor of the staging
folder, which this restore created empty and private (mode 0700). While files and folders are
written there is no symlink in it at all (links come last), so a path can only run through
folders this extraction made itself, and the table says exactly what is on disk. That is what
tarfile's filter re-derives with about twenty ``lstat`` calls per member; those calls, and the
header objects, made a restore of many small files four to twenty times slower than
``age -d | zstd -d | tar -x``. Symlink chains and PATH_MAX tricks (CVE-2025-4517) have nothing
to work on: the guard resolves a link's target through the archive's links in its table.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from spark_backup.engine.streams import Readable
from spark_backup.engine.tar_stream import (
    DIRECTORY,
    HARDLINK,
    REGULAR,
    SYMLINK,
    Member,
    TarFormatError,
    TarReader,
)
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


class UnsafeMember(Exception):
    """A member the guard refuses; the message says why."""


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

    def note_mode(self, name: str, member: Member) -> None:
        if member.mode & STRIPPED_MODE_BITS:
            self.modes_stripped_count += 1
            if len(self.modes_stripped) < MAX_LISTED:
                self.modes_stripped.append(f"{name} (mode {member.mode & 0o7777:o})")


def restored_file_mode(mode: int) -> int:
    """tarfile's ``data`` filter: no high bits or group/other write, owner may read and write,
    nobody executes unless the owner may."""
    mode &= 0o755
    if not mode & 0o100:
        mode &= ~0o111
    return mode | 0o600


class ArchiveGuard:
    """What the archive has extracted so far, and the rules a member must meet to join it."""

    def __init__(self) -> None:
        self.files: set[str] = set()  # regular files and hard links
        self.folders: set[str] = set()  # every folder made, members and implied parents
        self.directories: dict[str, float] = {}  # folder members -> mtime, set at the end
        self.links: dict[str, str] = {}  # name -> target, created at the end
        self.made_links: set[str] = set()

    def member_name(self, member: Member) -> str:
        """The member's name as components joined by '/'; refuses what could leave the root."""
        name = member.name
        if name.startswith("/"):
            raise UnsafeMember("it has an absolute path")
        if "/." in name or "//" in name or name.startswith(".") or name.endswith("/"):
            parts = [part for part in name.split("/") if part not in ("", ".")]
            if not parts or ".." in parts:
                raise UnsafeMember("its name contains '..' or is empty")
            normal = "/".join(parts)
        else:  # the common case: nothing to normalise
            normal, parts = name, None
            if not name:
                raise UnsafeMember("its name contains '..' or is empty")
        if normal.count("/") >= MAX_DEPTH:
            raise UnsafeMember(f"it is nested deeper than {MAX_DEPTH} folders")
        # A character takes at most four bytes in UTF-8.
        if len(normal) * 4 > MAX_NAME_BYTES and len(os.fsencode(normal)) > MAX_NAME_BYTES:
            raise UnsafeMember(f"its name is longer than {MAX_NAME_BYTES} bytes")
        if self.links:
            through = self._link_prefix(parts or normal.split("/"))
            if through:
                raise UnsafeMember(f"it goes through the archive's link {_short(through)!r}")
        return normal

    def admit_hardlink(self, member: Member) -> None:
        target = member.linkname
        parts = [part for part in target.split("/") if part not in ("", ".")]
        if target.startswith("/") or ".." in parts or "/".join(parts) not in self.files:
            raise UnsafeMember(
                f"it is a hard link to {_short(target)!r}, not to a file extracted before it"
            )

    def admit_file(self, name: str) -> None:
        """A file or hard link may replace an earlier file, never a folder."""
        if name in self.folders:
            raise UnsafeMember("it would replace a folder of the archive")

    def admit_folder(self, name: str) -> None:
        if name in self.files:
            raise UnsafeMember("it would replace a file of the archive")

    def check_link(self, name: str, member: Member) -> None:
        """A symlink, judged when all members are known: nothing else may sit where it goes,
        and its target must resolve inside the destination through the archive's links."""
        through = self._link_prefix(name.split("/")[:-1])
        if through:
            raise UnsafeMember(f"it goes through the archive's link {_short(through)!r}")
        if name in self.files or name in self.folders or name in self.made_links:
            raise UnsafeMember("it would replace a file or folder of the archive")
        if member.linkname.startswith("/"):
            raise UnsafeMember("it is a link to an absolute path")
        if self._resolve(name.split("/")[:-1], member.linkname, 0) is None:
            raise UnsafeMember(
                f"its target {_short(member.linkname)!r} leads outside the destination"
            )

    def parents_to_make(self, name: str) -> list[str]:
        """The folders above ``name`` that do not exist yet, outermost first; refuses a name
        below a file of the archive."""
        missing = []
        parent = name.rpartition("/")[0]
        while parent and parent not in self.folders:
            if parent in self.files:
                raise UnsafeMember(f"its folder {_short(parent)!r} is a file of the archive")
            missing.append(parent)
            parent = parent.rpartition("/")[0]
        missing.reverse()
        return missing

    def _link_prefix(self, parts: list[str]) -> str | None:
        if not self.links:
            return None
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


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _Extraction:
    """One extraction into the folder open as ``root`` (every path is relative to it)."""

    def __init__(self, root: int, skip_unsafe: bool):
        self.root = root
        self.skip_unsafe = skip_unsafe
        self.guard = ArchiveGuard()
        self.summary = ExtractSummary()
        self.deferred: list[tuple[str, Member]] = []
        self.umask = _current_umask()

    def refuse(self, member: Member, reason: str) -> None:
        if not self.skip_unsafe:
            raise RestoreRefused(
                f"refusing unsafe archive member {_short(member.name)!r}: {_short(reason, 300)} "
                "(--skip-unsafe leaves it out)"
            )
        self.summary.skipped.append(f"{member.name}: {reason}")

    def member(self, member: Member, reader: TarReader) -> None:
        guard = self.guard
        try:
            name = guard.member_name(member)
            if member.unsupported:
                raise UnsafeMember(member.unsupported)
            kind = member.type
            if kind in REGULAR:
                guard.admit_file(name)
            elif kind == SYMLINK:
                guard.links[name] = member.linkname
                self.deferred.append((name, member))
                return
            elif kind == DIRECTORY:
                guard.admit_folder(name)
            elif kind == HARDLINK:
                guard.admit_file(name)
                guard.admit_hardlink(member)
            else:
                raise UnsafeMember("it is a special file (a device, FIFO or unknown type)")
            parent = name.rpartition("/")[0]
            # The common case, a file in a folder made before, needs no walk up the name.
            parents = guard.parents_to_make(name) if parent not in guard.folders else ()
        except UnsafeMember as error:
            self.refuse(member, str(error))
            return
        for folder in parents:
            self.make_folder(folder)
        summary = self.summary
        if kind in REGULAR:
            self.write_file(name, member, reader)
            summary.files += 1
            summary.bytes += member.size
        elif kind == DIRECTORY:
            if name not in guard.folders:
                self.make_folder(name)
            guard.directories[name] = member.mtime
            summary.directories += 1
        else:
            self.hard_link(name, member)
        if member.mode & STRIPPED_MODE_BITS:
            summary.note_mode(name, member)

    def make_folder(self, name: str) -> None:
        try:
            os.mkdir(name, dir_fd=self.root)
        except FileExistsError:
            # Only what this extraction made can be there, and the table knows it all.
            if not stat.S_ISDIR(os.lstat(name, dir_fd=self.root).st_mode):
                raise
        self.guard.folders.add(name)

    def _replace(self, name: str) -> None:
        """A later member of the same name replaces the earlier file (as GNU tar does), without
        writing through to a hard link that shares it."""
        if name in self.guard.files:
            os.unlink(name, dir_fd=self.root)

    def write_file(self, name: str, member: Member, reader: TarReader) -> None:
        if name in self.guard.files:
            self._replace(name)
        mode = restored_file_mode(member.mode)
        fd = os.open(name, _CREATE, mode, dir_fd=self.root)
        try:
            reader.copy_to(member, fd)
            if self.umask is None or mode & self.umask:
                os.fchmod(fd, mode)  # the umask took bits the archive gives
            os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)
        self.guard.files.add(name)

    def hard_link(self, name: str, member: Member) -> None:
        self._replace(name)
        target = "/".join(p for p in member.linkname.split("/") if p not in ("", "."))
        os.link(target, name, src_dir_fd=self.root, dst_dir_fd=self.root, follow_symlinks=False)
        # tarfile gives the shared file the link member's mode and time; so does this.
        os.chmod(name, restored_file_mode(member.mode), dir_fd=self.root)
        os.utime(name, (member.mtime, member.mtime), dir_fd=self.root, follow_symlinks=False)
        self.guard.files.add(name)

    def finish(self) -> None:
        """Create the links, then give the folders the archive's times (creating entries in a
        folder moves its time)."""
        guard = self.guard
        for name, member in self.deferred:
            try:
                guard.check_link(name, member)
                parents = guard.parents_to_make(name)
            except UnsafeMember as error:
                self.refuse(member, str(error))
                del guard.links[name]
                continue
            for parent in parents:
                self.make_folder(parent)
            os.symlink(member.linkname, name, dir_fd=self.root)
            os.utime(name, (member.mtime, member.mtime), dir_fd=self.root, follow_symlinks=False)
            guard.made_links.add(name)
            self.summary.symlinks += 1
        for name, mtime in guard.directories.items():
            os.utime(name, (mtime, mtime), dir_fd=self.root, follow_symlinks=False)


def extract_tar(plain: Readable, destination: Path, skip_unsafe: bool = False) -> ExtractSummary:
    """Extract a tar stream into ``destination``, an empty folder this restore created.

    An unsafe member refuses the whole extraction (``RestoreRefused``), or with ``skip_unsafe``
    is left out and listed in the summary, so that for instance an absolute ``/etc/localtime``
    link can be recreated by hand.
    """
    root = os.open(destination, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    extraction = _Extraction(root, skip_unsafe)
    try:
        reader = TarReader(plain)
        for member in reader:
            extraction.member(member, reader)
        extraction.finish()
    except TarFormatError as exc:
        raise RestoreRefused(f"copy is not a readable tar archive: {exc}") from None
    except OSError as exc:
        where = destination / exc.filename if isinstance(exc.filename, str) else destination
        raise RestoreRefused(
            f"restore failed while writing {where}: {exc.strerror} (nothing was published)"
        ) from None
    finally:
        os.close(root)
    return extraction.summary


def count_members(plain: Readable) -> ExtractSummary:
    """Count an archive's members without extracting anything (``TarFormatError`` if it is
    not a tar archive)."""
    summary = ExtractSummary()
    for member in TarReader(plain):
        if member.isreg():
            summary.files += 1
            summary.bytes += member.size
        elif member.isdir():
            summary.directories += 1
        elif member.issym():
            summary.symlinks += 1
    return summary


def _current_umask() -> int | None:
    """The process's umask, read without changing it (os.umask would, for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
