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
import re
import secrets
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyrage import x25519

from spark_backup.engine.manifest import Manifest
from spark_backup.engine.pipeline import open_copy
from spark_backup.engine.stores.base import ObjectStore
from spark_backup.engine.streams import ProgressCallback, Readable
from spark_backup.errors import IntegrityError, RestoreRefused, SourceError
from spark_backup.plan import ConfigArchiveSource, LoadedPlan

KIND = "config_archive"
TAR_LAYERS = ["tar"]
# Warnings kept in a manifest; the count says how many there were in all.
MAX_WARNINGS = 20
STAGING_PREFIX = ".spark-backup-restore-"


# --- include / exclude globs -------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Translate a glob to a regex over absolute POSIX paths.

    ``*`` and ``?`` stay within one path segment, ``**`` spans segments, ``[...]`` is a class.
    A pattern without '/' matches a basename anywhere (``*.swp``); one with '/' matches the whole
    path from the root (``/etc/kubernetes/**/*.yaml``); a relative one with '/' matches at any
    depth (``secrets/*.key``).
    """
    if "/" not in pattern:
        pattern = "**/" + pattern
    elif not pattern.startswith("/"):
        pattern = "/**/" + pattern
    regex, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            regex += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            regex += ".*"
            i += 2
        elif char == "*":
            regex += "[^/]*"
            i += 1
        elif char == "?":
            regex += "[^/]"
            i += 1
        elif char == "[":
            end = pattern.find("]", i + 2)
            if end == -1:
                regex += re.escape(char)
                i += 1
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                regex += "[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]"
                i = end + 1
        else:
            regex += re.escape(char)
            i += 1
    return re.compile(("^/?" if not pattern.startswith("/") else "^") + regex + "$")


def matches_any(path: str, patterns: Sequence[str]) -> bool:
    return any(glob_to_regex(p).match(path) for p in patterns)


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
        self.one_file_system = one_file_system
        self.stats = TreeStats()

    def collect(self) -> list[str]:
        """Walk the paths; return archive members (absolute paths) in archive order."""
        self.stats = TreeStats()
        members: list[str] = []
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
            found = [m for m in self._walk(root, root_stat, root_stat.st_dev) if m not in seen]
            walked += len(found)
            # Parent directories first, so that a restore recreates them with their modes.
            parents = [str(a) for a in reversed(root.parents) if str(a) != "/"]
            for member in [*(parents if found else []), *found]:
                if member not in seen:
                    seen.add(member)
                    members.append(member)
        if not walked:
            raise SourceError(
                f"source {self.source_name!r}: include/exclude patterns left nothing to back up"
            )
        return members

    def _walk(self, path: Path, st: os.stat_result, device: int) -> Iterator[str]:
        text = str(path)
        if self.exclude and matches_any(text, self.exclude):
            self.stats.excluded += 1
            return
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            if self._included(text):
                self.stats.symlinks += 1
                yield text
        elif stat.S_ISREG(mode):
            if not self._included(text):
                return
            if not os.access(path, os.R_OK):
                raise SourceError(
                    f"source {self.source_name!r}: cannot read {text}: permission denied"
                )
            self.stats.files += 1
            self.stats.bytes += st.st_size
            yield text
        elif stat.S_ISDIR(mode):
            try:
                entries = sorted(os.scandir(path), key=lambda e: e.name)
            except OSError as exc:
                raise SourceError(
                    f"source {self.source_name!r}: cannot read {text}: {exc.strerror}"
                ) from None
            children: list[str] = []
            for entry in entries:
                child_stat = entry.stat(follow_symlinks=False)
                if (
                    self.one_file_system
                    and stat.S_ISDIR(child_stat.st_mode)
                    and child_stat.st_dev != device
                ):
                    self.stats.warn(f"{entry.path} is on another file system; not archived")
                    continue
                children.extend(self._walk(Path(entry.path), child_stat, device))
            # A directory is archived when everything is included, or when it holds something
            # included: include patterns select files, not the folders around them.
            if not self.include or children:
                self.stats.directories += 1
                yield text
            yield from children
        else:
            self.stats.skipped_special += 1
            self.stats.warn(f"{text} is a socket, FIFO or device file; not archived")

    def _included(self, path: str) -> bool:
        return not self.include or matches_any(path, self.include)

    @contextmanager
    def open(self) -> Iterator[Readable]:
        members = self.collect()
        with tempfile.TemporaryDirectory(prefix="spark-backup-tar-") as scratch:
            file_list = Path(scratch, "members")
            # Relative to '/', so member names carry no leading slash (tar would strip it noisily).
            file_list.write_bytes(b"".join(os.fsencode(m.lstrip("/")) + b"\0" for m in members))
            stderr_path = Path(scratch, "stderr")
            with open(stderr_path, "wb") as stderr:
                process = subprocess.Popen(
                    [
                        "tar",
                        "--create",
                        "--file=-",
                        "--format=pax",
                        # atime/ctime headers would make every archive differ; mtime is kept.
                        "--pax-option=delete=atime,delete=ctime",
                        "--no-recursion",
                        "--null",
                        "--directory=/",
                        f"--files-from={file_list}",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    stdin=subprocess.DEVNULL,
                )
            assert process.stdout is not None
            try:
                yield process.stdout
                leftover = process.stdout.read(1)
            finally:
                process.stdout.close()
                status = process.wait()
            messages = stderr_path.read_text(errors="replace").splitlines()
            if leftover:
                raise SourceError(
                    f"source {self.source_name!r}: tar stream was not read to its end"
                )
            # GNU tar: 1 means some files changed while being read (kept, with a warning);
            # 2 means a fatal error, such as a file that could not be opened.
            if status not in (0, 1):
                detail = next(
                    (m for m in messages if m.strip()), f"tar exited with status {status}"
                )
                raise SourceError(f"source {self.source_name!r}: {detail}")
            for message in messages:
                self.stats.warn(message)

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
        out = subprocess.run(["tar", "--version"], capture_output=True, text=True, check=True)
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
    target.mkdir(parents=True, exist_ok=True)
    staging = target / f"{STAGING_PREFIX}{secrets.token_hex(4)}"
    staging.mkdir(mode=0o700)
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


def extract_archive(plain: Readable, staging: Path, skip_unsafe: bool = False) -> RestoreSummary:
    """Extract a tar stream into ``staging`` through tarfile's ``data`` filter.

    An unsafe member (absolute path, '..', a link leaving the target or pointing to an absolute
    path, a device file) refuses the whole restore, or with ``skip_unsafe`` is left out and
    reported, so that for instance an absolute ``/etc/localtime`` link can be recreated by hand.
    """
    counts = _new_counts()
    skipped: list[str] = []

    def data_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        try:
            if member.name.startswith("/"):
                # tarfile would strip the slash; spark-backup never writes one, so refuse it.
                raise tarfile.AbsolutePathError(member)
            checked = tarfile.data_filter(member, dest)
        except tarfile.FilterError as exc:
            if skip_unsafe:
                skipped.append(f"{member.name}: {exc}")
                return None
            raise RestoreRefused(
                f"refusing unsafe archive member {member.name!r}: {exc} (--skip-unsafe leaves it out)"
            ) from None
        _count(counts, checked)
        return checked

    try:
        with tarfile.open(fileobj=plain, mode="r|") as archive:
            archive.extractall(staging, filter=data_filter)
    except tarfile.ReadError as exc:
        raise RestoreRefused(f"copy is not a readable tar archive: {exc}") from None
    return RestoreSummary(str(staging), skipped=skipped, **counts)


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
    """The archive must list the members the backup recorded."""
    try:
        counts = list_archive(plain)
    except tarfile.TarError as exc:
        raise IntegrityError(f"copy {manifest.id}: not a readable tar archive: {exc}") from None
    recorded = manifest.source_metadata
    for name in ("files", "symlinks", "bytes"):
        if name in recorded and counts[name] != recorded[name]:
            raise IntegrityError(
                f"copy {manifest.id}: archive holds {counts[name]} {name}, the manifest recorded "
                f"{recorded[name]}"
            )
