"""Configuration archives: DGX, Kubernetes and VPN configuration trees as POSIX tar streams.

Backup walks the plan's paths in Python (so include/exclude globs, unreadable paths and special
files are decided and reported here) and hands the resulting list to GNU tar, which writes a
pax archive that keeps modes, owners, mtimes and symlinks as links. GNU tar is used for speed:
Python's tarfile spends about four times as long per member on trees of small files.

Restore reads the stream with Python's tarfile and its ``data`` filter (no absolute paths, no
``..``, no links leaving the target, no device files) into a hidden staging folder inside the
target; files are moved into place only after the copy's checksums were confirmed, and
existing files are never overwritten unless asked to.
"""

from __future__ import annotations

import functools
import os
import posixpath
import secrets
import shutil
import stat
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pyrage import x25519

from spark_backup.engine.manifest import Manifest
from spark_backup.engine.pipeline import open_copy
from spark_backup.engine.processes import tool_environment
from spark_backup.engine.stores.base import ObjectStore
from spark_backup.engine.streams import ProgressCallback, Readable
from spark_backup.errors import IntegrityError, RestoreRefused, SourceError
from spark_backup.globs import patterns_regex
from spark_backup.plan import ConfigArchiveSource, LoadedPlan

KIND = "config_archive"
TAR_LAYERS = ["tar"]
# Warnings kept in a manifest; the count says how many there were in all.
MAX_WARNINGS = 20
STAGING_PREFIX = ".spark-backup-restore-"


# --- backup ------------------------------------------------------------------------------------


@dataclass
class TreeStats:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    excluded: int = 0
    skipped_special: int = 0
    warnings: list[str] = field(default_factory=list)
    warning_count: int = 0

    def warn(self, message: str) -> None:
        self.warning_count += 1
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(message)


class ConfigArchiveReader:
    """A ``PlaintextSource`` producing a pax tar stream of the given paths."""

    kind = KIND
    layers = TAR_LAYERS

    def __init__(
        self,
        source_name: str,
        paths: Sequence[Path],
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        one_file_system: bool = True,
    ):
        self.source_name = source_name
        self.paths = [Path(os.path.abspath(p)) for p in paths]
        self.include = list(include)
        self.exclude = list(exclude)
        self._include = patterns_regex(self.include)
        self._exclude = patterns_regex(self.exclude)
        self.one_file_system = one_file_system
        self.stats = TreeStats()

    def collect(self) -> list[str]:
        """Walk the paths; return archive members (absolute paths) in archive order."""
        return list(self.members())

    def members(self) -> Iterator[str]:
        """Archive members (absolute paths) in archive order, a folder before its content,
        while walking the paths. ``stats`` is complete when the iterator is exhausted."""
        self.stats = TreeStats()
        seen: set[str] = set()
        walked = 0
        for root in self.paths:
            try:
                root_stat = os.lstat(root)
            except FileNotFoundError:
                raise SourceError(
                    f"source {self.source_name!r}: path {root} does not exist"
                ) from None
            except OSError as exc:
                raise SourceError(
                    f"source {self.source_name!r}: cannot read {root}: {exc.strerror}"
                ) from None
            if stat.S_ISLNK(root_stat.st_mode):
                self.stats.warn(f"{root} is a symlink; archived as a link, its target is not")
            # Parent folders first, so that a restore recreates them with their modes; like
            # every folder, only once something below them is archived.
            pending = [str(a) for a in reversed(root.parents) if str(a) != "/"]
            for member in self._walk(str(root), root_stat, root_stat.st_dev, pending):
                if member not in seen:
                    seen.add(member)
                    walked += 1
                    yield member
        if not walked:
            raise SourceError(
                f"source {self.source_name!r}: include/exclude patterns left nothing to back up"
            )

    def _walk(
        self, path: str, st: os.stat_result, device: int, pending: list[str]
    ) -> Iterator[str]:
        """Members under ``path``. Folders wait in ``pending`` until something in them is
        archived: with include patterns, a folder with nothing included is left out."""
        if self._exclude and self._exclude.match(path):
            self.stats.excluded += 1
            return
        mode = st.st_mode
        if stat.S_ISLNK(mode) or stat.S_ISREG(mode):
            if not self._included(path):
                return
            if stat.S_ISLNK(mode):
                self.stats.symlinks += 1
            elif not os.access(path, os.R_OK):
                if not os.path.lexists(path):
                    self.stats.warn(f"{path} vanished while the folder was read")
                    return
                raise SourceError(
                    f"source {self.source_name!r}: cannot read {path}: permission denied"
                )
            else:
                self.stats.files += 1
                self.stats.bytes += st.st_size
            yield from pending
            pending.clear()
            yield path
        elif stat.S_ISDIR(mode):
            try:
                with os.scandir(path) as listing:
                    entries = sorted(listing, key=lambda e: e.name)
            except FileNotFoundError:
                self.stats.warn(f"{path} vanished while it was read")
                return
            except OSError as exc:
                raise SourceError(
                    f"source {self.source_name!r}: cannot read {path}: {exc.strerror}"
                ) from None
            self.stats.directories += 1
            if self.include:
                pending.append(path)
            else:
                yield from pending
                pending.clear()
                yield path
            for entry in entries:
                try:
                    child_stat = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    self.stats.warn(f"{entry.path} vanished while the folder was read")
                    continue
                except OSError as exc:
                    raise SourceError(
                        f"source {self.source_name!r}: cannot read {entry.path}: {exc.strerror}"
                    ) from None
                if (
                    self.one_file_system
                    and stat.S_ISDIR(child_stat.st_mode)
                    and child_stat.st_dev != device
                ):
                    self.stats.warn(f"{entry.path} is on another file system; not archived")
                    continue
                yield from self._walk(entry.path, child_stat, device, pending)
            if pending and pending[-1] == path:
                pending.pop()  # nothing in it was included
                self.stats.directories -= 1
        else:
            self.stats.skipped_special += 1
            self.stats.warn(f"{path} is a socket, FIFO or device file; not archived")

    def _included(self, path: str) -> bool:
        return self._include is None or bool(self._include.match(path))

    @contextmanager
    def open(self) -> Iterator[Readable]:
        """GNU tar's output, while a thread walks the paths and hands tar the member names:
        tar starts reading files at once instead of after the whole walk."""
        with tempfile.TemporaryFile(prefix="spark-backup-tar-") as stderr:
            try:
                process = subprocess.Popen(
                    [
                        "tar",
                        "--create",
                        "--file=-",
                        "--format=pax",
                        # No per-member extended headers for times: atime/ctime would make every
                        # archive differ, and mtime goes into the ustar header to the second (as
                        # GNU tar's default format keeps it), which halves what a restore parses.
                        "--pax-option=delete=atime,delete=ctime,delete=mtime",
                        "--no-recursion",
                        "--null",
                        "--directory=/",
                        "--files-from=-",
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    env=tool_environment(),
                )
            except FileNotFoundError:
                raise SourceError(
                    "GNU tar is needed to create configuration archives and is not on PATH"
                ) from None
            assert process.stdin is not None and process.stdout is not None
            walk_errors: list[BaseException] = []
            walker = threading.Thread(
                target=self._hand_members,
                args=(process.stdin, walk_errors),
                name=f"walk-{self.source_name}",
                daemon=True,
            )
            walker.start()
            try:
                yield process.stdout
                leftover = process.stdout.read(1)
            finally:
                process.stdout.close()  # if the reader stopped early, tar stops on a broken pipe
                walker.join()
                status = process.wait()
            stderr.seek(0)
            messages = stderr.read().decode(errors="replace").splitlines()
        if walk_errors:
            raise walk_errors[0]
        if leftover:
            raise SourceError(f"source {self.source_name!r}: tar stream was not read to its end")
        # GNU tar: 1 means some files changed while being read (kept, with a warning);
        # 2 means a fatal error, such as a file that could not be opened.
        if status not in (0, 1):
            detail = next((m for m in messages if m.strip()), f"tar exited with status {status}")
            raise SourceError(f"source {self.source_name!r}: {detail}")
        for message in messages:
            self.stats.warn(message)

    def _hand_members(self, names: BinaryIO, errors: list[BaseException]) -> None:
        """Write member names to tar, relative to '/' (tar would strip the slash noisily)."""
        try:
            batch: list[bytes] = []
            for member in self.members():
                batch.append(os.fsencode(member[1:]) + b"\0")
                if len(batch) >= 256:
                    names.write(b"".join(batch))
                    batch.clear()
            names.write(b"".join(batch))
        except BrokenPipeError:
            pass  # tar stopped first; its status says why
        except BaseException as exc:
            errors.append(exc)
        finally:
            with suppress(BrokenPipeError):
                names.close()

    def metadata(self) -> dict[str, Any]:
        stats = asdict(self.stats)
        return {
            "paths": [str(p) for p in self.paths],
            "include": self.include,
            "exclude": self.exclude,
            **stats,
        }

    def tool_versions(self) -> dict[str, str]:
        return {"tar": _tar_version()}


@functools.cache
def _tar_version() -> str:
    try:
        out = subprocess.run(
            ["tar", "--version"],
            capture_output=True,
            text=True,
            check=True,
            env=tool_environment(),
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SourceError(f"GNU tar is needed to create configuration archives: {exc}") from None
    return out.stdout.splitlines()[0]


# --- restore -----------------------------------------------------------------------------------


@dataclass
class RestoreSummary:
    target: str
    files: int
    directories: int
    symlinks: int
    bytes: int
    skipped: list[str]


@contextmanager
def staged_restore(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """A hidden folder inside ``target`` to extract into. Its content is moved into ``target``
    when the block exits cleanly, and removed when it raises: a failed or damaged restore leaves
    the target as it was."""
    target = Path(os.path.abspath(target))
    if target.exists() and not target.is_dir():
        raise RestoreRefused(f"restore target {target} exists and is not a directory")
    staging = target / f"{STAGING_PREFIX}{secrets.token_hex(4)}"
    try:
        target.mkdir(parents=True, exist_ok=True)
        staging.mkdir(mode=0o700)
    except OSError as exc:
        raise RestoreRefused(f"cannot create restore target {target}: {exc.strerror}") from None
    try:
        yield staging
        collisions = _collisions(staging, target)
        if collisions and not overwrite:
            shown = ", ".join(str(target / c) for c in collisions[:3])
            more = f" and {len(collisions) - 3} more" if len(collisions) > 3 else ""
            raise RestoreRefused(
                f"restore would overwrite {shown}{more}; restore into an empty folder or pass --overwrite"
            )
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _UnsafeMember(tarfile.FilterError):
    def __init__(self, member: tarfile.TarInfo, reason: str):
        super().__init__(reason)
        self.tarinfo = member


class ArchiveLinkGuard:
    """Refuses members that would go through a symlink the archive itself created.

    tarfile's ``data`` filter resolves real paths on disk; before Python 3.11.13 that resolution
    can be fooled by chains of symlinks longer than PATH_MAX (CVE-2025-4517 and relatives), and a
    later member then writes through a link to outside the target. The staging folder starts
    empty, so the archive's own symlinks are the only links there can be: a member whose path
    passes through one (or replaces one), or a link whose target does, is refused, and a link
    target must stay inside the target by its letters alone.
    """

    def __init__(self) -> None:
        self._links: set[str] = set()

    def check(self, member: tarfile.TarInfo) -> None:
        if member.name.startswith("/"):
            # tarfile would strip the slash; spark-backup never writes one, so refuse it.
            raise tarfile.AbsolutePathError(member)
        name = posixpath.normpath(member.name)
        through = self._first_link(name, include_last=True)
        if through:
            raise _UnsafeMember(member, f"it goes through the archive's link {through[:100]!r}")
        if member.issym() or member.islnk():
            if posixpath.isabs(member.linkname):
                raise tarfile.AbsoluteLinkError(member)
            base = posixpath.dirname(name) if member.issym() else ""
            target = posixpath.normpath(posixpath.join(base, member.linkname))
            if target == ".." or target.startswith("../"):
                raise tarfile.LinkOutsideDestinationError(member, target)
            through = self._first_link(target, include_last=False)
            if through:
                raise _UnsafeMember(
                    member, f"its target goes through the archive's link {through[:100]!r}"
                )

    def extracted(self, member: tarfile.TarInfo) -> None:
        if member.issym():
            self._links.add(posixpath.normpath(member.name))

    def _first_link(self, path: str, include_last: bool) -> str | None:
        parts = path.split("/")
        for end in range(1, len(parts) + (1 if include_last else 0)):
            prefix = "/".join(parts[:end])
            if prefix in self._links:
                return prefix
        return None


def extract_archive(plain: Readable, staging: Path, skip_unsafe: bool = False) -> RestoreSummary:
    """Extract a tar stream into ``staging`` through tarfile's ``data`` filter, and
    ``ArchiveLinkGuard`` before it.

    An unsafe member (absolute path, '..', a link leaving the target or pointing to an absolute
    path, a path through one of the archive's links, a device file) refuses the whole restore,
    or with ``skip_unsafe`` is left out and reported, so that for instance an absolute
    ``/etc/localtime`` link can be recreated by hand.
    """
    counts = _new_counts()
    skipped: list[str] = []
    links = ArchiveLinkGuard()

    def data_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        try:
            links.check(member)
            checked = tarfile.data_filter(member, dest)
        except tarfile.FilterError as exc:
            if skip_unsafe:
                skipped.append(f"{member.name}: {exc}")
                return None
            shown = member.name if len(member.name) <= 120 else member.name[:117] + "..."
            raise RestoreRefused(
                f"refusing unsafe archive member {shown!r}: {_shorten(str(exc))} "
                "(--skip-unsafe leaves it out)"
            ) from None
        links.extracted(checked)
        _count(counts, checked)
        return checked

    try:
        with tarfile.open(fileobj=plain, mode="r|") as archive:
            archive.extractall(staging, filter=data_filter)
    except tarfile.ReadError as exc:
        raise RestoreRefused(f"copy is not a readable tar archive: {exc}") from None
    return RestoreSummary(str(staging), skipped=skipped, **counts)


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def list_archive(plain: Readable) -> dict[str, int]:
    """Count members without extracting: a deep verify of a configuration archive."""
    counts = _new_counts()
    with tarfile.open(fileobj=plain, mode="r|") as archive:
        for member in archive:
            _count(counts, member)
    return counts


def _new_counts() -> dict[str, int]:
    return {"files": 0, "directories": 0, "symlinks": 0, "bytes": 0}


def _count(counts: dict[str, int], member: tarfile.TarInfo) -> None:
    if member.isreg():
        counts["files"] += 1
        counts["bytes"] += member.size
    elif member.isdir():
        counts["directories"] += 1
    elif member.issym():
        counts["symlinks"] += 1


def _collisions(staging: Path, target: Path) -> list[str]:
    found = []
    for directory, dirs, files in os.walk(staging):
        relative = Path(directory).relative_to(staging)
        for name in [*files, *[d for d in dirs if Path(directory, d).is_symlink()]]:
            if os.path.lexists(target / relative / name):
                found.append(str(relative / name))
        for name in dirs:
            existing = target / relative / name
            if os.path.lexists(existing) and not (existing.is_dir() and not existing.is_symlink()):
                found.append(str(relative / name))
    return sorted(found)


def _publish(staging: Path, target: Path) -> None:
    """Move staged entries into the target; directories that exist already are merged."""
    for entry in sorted(staging.iterdir()):
        _move(entry, target / entry.name)


def _move(source: Path, destination: Path) -> None:
    if (
        source.is_dir()
        and not source.is_symlink()
        and destination.is_dir()
        and not destination.is_symlink()
    ):
        for child in sorted(source.iterdir()):
            _move(child, destination / child.name)
        return
    if destination.is_dir() and not destination.is_symlink():
        shutil.rmtree(destination)
    os.replace(source, destination)


# --- entry points for the service --------------------------------------------------------------


def reader_for(source: ConfigArchiveSource, loaded: LoadedPlan) -> ConfigArchiveReader:
    return ConfigArchiveReader(
        source.name,
        [loaded.resolve(p) for p in source.paths],
        include=source.include,
        exclude=source.exclude,
        one_file_system=source.one_file_system,
    )


def restore_copy(
    store: ObjectStore,
    manifest: Manifest,
    identities: list[x25519.Identity],
    target: Path,
    *,
    overwrite: bool = False,
    skip_unsafe: bool = False,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    # open_copy exits (checksums compared) before staged_restore publishes anything.
    with (
        staged_restore(target, overwrite) as staging,
        open_copy(store, manifest, identities, progress) as plain,
    ):
        summary = extract_archive(plain, staging, skip_unsafe)
    summary.target = str(Path(os.path.abspath(target)))
    return asdict(summary)


def check_plaintext(plain: Readable, manifest: Manifest) -> None:
    """The archive must list the files and links the backup recorded. (Not their bytes: the
    walk sizes a file before tar reads it, and a live file may grow in between; the plaintext
    sha256 covers the content.)"""
    try:
        counts = list_archive(plain)
    except tarfile.TarError as exc:
        raise IntegrityError(f"copy {manifest.id}: not a readable tar archive: {exc}") from None
    recorded = manifest.source_metadata
    for name in ("files", "symlinks"):
        if name in recorded and counts[name] != recorded[name]:
            raise IntegrityError(
                f"copy {manifest.id}: archive holds {counts[name]} {name}, the manifest recorded "
                f"{recorded[name]}"
            )
