"""The configuration archive's reader: a tree walk that hands member names to GNU tar.

Backup walks the plan's paths in Python (so include/exclude globs, unreadable paths and special
files are decided and reported here) and hands the member names to GNU tar as it finds them;
tar writes a pax archive that keeps modes, owners, mtimes and symlinks as links. GNU tar is
used for speed: Python's tarfile spends about four times as long per member on trees of small
files.
"""

from __future__ import annotations

import functools
import os
import re
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from spark_backup.engine.processes import tool_environment
from spark_backup.engine.streams import Readable, widen_pipe
from spark_backup.errors import SourceError
from spark_backup.globs import patterns_regex
from spark_backup.sources.config_archive.names import KIND_NAME

TAR_LAYERS = ["tar"]
# Warnings kept in a manifest; the count says how many there were in all.
MAX_WARNINGS = 20
# GNU tar's messages for such files (read in the C locale; names are quoted in tar's escape
# style, so one message is one line).
_SHRANK_RE = re.compile(rb"^tar: (?P<name>.+): File shrank by \d+ bytes; padding with zeros$")
_CHANGED_RE = re.compile(rb"^tar: (?P<name>.+): file changed as we read it$")
# tar's escape quoting: C escapes and three-digit octal bytes.
_TAR_ESCAPE_RE = re.compile(rb"\\([0-7]{3}|.)", re.DOTALL)
_TAR_ESCAPES = {
    b"a": b"\a",
    b"b": b"\b",
    b"f": b"\f",
    b"n": b"\n",
    b"r": b"\r",
    b"t": b"\t",
    b"v": b"\v",
}


# --- backup ------------------------------------------------------------------------------------


@dataclass
class TreeStats:
    """What a walk of the backed-up folders found."""

    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    excluded: int = 0
    skipped_special: int = 0
    warnings: list[str] = field(default_factory=list)
    warning_count: int = 0
    torn_files: list[str] = field(default_factory=list)
    changed_files: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        self.warning_count += 1
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(message)


class ConfigArchiveReader:
    """A ``PlaintextSource`` producing a pax tar stream of the given paths."""

    kind = KIND_NAME
    layers = TAR_LAYERS

    def __init__(
        self,
        source_name: str,
        paths: Sequence[Path],
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        one_file_system: bool = True,
        allow_torn_files: bool = False,
    ):
        self.source_name = source_name
        # Parent folders reached through links (``/lib -> usr/lib``) are resolved, so that the
        # archive never holds members below one of its own links; the root itself is kept
        # as it is (a root that is a link is archived as the link).
        given = [Path(os.path.abspath(p)) for p in paths]
        self.paths = [Path(os.path.realpath(path.parent), path.name) for path in given]
        self._through_link = {
            str(real): str(path)
            for path, real in zip(given, self.paths, strict=True)
            if path != real
        }
        self.include = list(include)
        self.exclude = list(exclude)
        self._include = patterns_regex(self.include)
        self._exclude = patterns_regex(self.exclude)
        self.one_file_system = one_file_system
        self.allow_torn_files = allow_torn_files
        self.stats = TreeStats()
        self._uid = -1  # the walking process's real user id, which os.access answers for

    def collect(self) -> list[str]:
        """Walk the paths; return archive members (absolute paths) in archive order."""
        return list(self.members())

    def members(self) -> Iterator[str]:
        """Archive members (absolute paths) in archive order, a folder before its content,
        while walking the paths. ``stats`` is complete when the iterator is exhausted."""
        self.stats = TreeStats()
        self._uid = os.getuid()
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
            if str(root) in self._through_link:
                self.stats.warn(
                    f"{self._through_link[str(root)]} is reached through a link; archived as {root}"
                )
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
        archived: with include patterns, a folder with nothing included is left out. Files and
        links are judged in their folder's loop (``_leaf``), without a generator each: most
        members are files, and a generator per member was a third of the walk's cost."""
        if self._exclude and self._exclude.match(path):
            self.stats.excluded += 1
            return
        mode = st.st_mode
        if stat.S_ISLNK(mode) or stat.S_ISREG(mode):
            if self._leaf(path, st):
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
            exclude = self._exclude
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
                child_mode = child_stat.st_mode
                if stat.S_ISREG(child_mode) or stat.S_ISLNK(child_mode):
                    child = entry.path
                    if exclude and exclude.match(child):
                        self.stats.excluded += 1
                    elif self._leaf(child, child_stat):
                        if pending:
                            yield from pending
                            pending.clear()
                        yield child
                    continue
                if (
                    self.one_file_system
                    and stat.S_ISDIR(child_mode)
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

    def _leaf(self, path: str, st: os.stat_result) -> bool:
        """Whether a file or symlink (not excluded) is archived; counts it. An unreadable file
        is an error, one that vanished a warning."""
        if not self._included(path):
            return False
        if stat.S_ISLNK(st.st_mode):
            self.stats.symlinks += 1
            return True
        # The owner's read bit decides for the owner (an ACL's owner entry is those bits), so
        # only files of other owners, or without it, need the kernel's answer: one system call
        # per file less when the backup runs as the owner of what it reads.
        if not (st.st_uid == self._uid and st.st_mode & stat.S_IRUSR) and not os.access(
            path, os.R_OK
        ):
            if not os.path.lexists(path):
                self.stats.warn(f"{path} vanished while the folder was read")
                return False
            raise SourceError(f"source {self.source_name!r}: cannot read {path}: permission denied")
        self.stats.files += 1
        self.stats.bytes += st.st_size
        return True

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
                        "--quoting-style=escape",  # names in messages, as _unquote reads them
                        # No per-member extended headers for times: atime/ctime would make every
                        # archive differ, and mtime goes into the ustar header to the second (as
                        # GNU tar's default format keeps it), which halves what a restore parses.
                        "--pax-option=delete=atime,delete=ctime,delete=mtime",
                        "--no-recursion",
                        "--null",
                        "--directory=/",
                        "--files-from=-",
                        # Records of 64 KiB instead of 10 KiB, into a pipe that holds 1 MiB: tar
                        # makes a sixth of the writes and the reader wakes that much less often
                        # (a 20,000-file backup about 4% faster at load 2 to 3.5; see
                        # benchmarks/README.md, "The tree backup by thread").
                        "--blocking-factor=128",
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    env=_tar_environment(),
                )
            except FileNotFoundError:
                raise SourceError(
                    "GNU tar is needed to create configuration archives and is not on PATH"
                ) from None
            assert process.stdin is not None and process.stdout is not None
            widen_pipe(process.stdout.fileno())
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
            messages = stderr.read().splitlines()
        if walk_errors:
            raise walk_errors[0]
        if leftover:
            raise SourceError(f"source {self.source_name!r}: tar stream was not read to its end")
        # GNU tar: 1 means some files changed while being read (kept, with a warning);
        # 2 means a fatal error, such as a file that could not be opened.
        if status not in (0, 1):
            text = [m.decode(errors="replace") for m in messages if m.strip()]
            detail = text[0] if text else f"tar exited with status {status}"
            raise SourceError(f"source {self.source_name!r}: {detail}")
        for message in messages:
            if shrank := _SHRANK_RE.match(message):
                self.stats.torn_files.append(_unquote(shrank["name"]))
            elif changed := _CHANGED_RE.match(message):
                path = _unquote(changed["name"])
                # A folder's entry is its name and mode only: nothing in it can be torn.
                if not _is_folder(path):
                    self.stats.changed_files.append(path)
            self.stats.warn(message.decode(errors="replace"))
        # A file tar padded may be reported as changed as well: it counts once, as shrunk.
        self.stats.changed_files = [
            path for path in self.stats.changed_files if path not in self.stats.torn_files
        ]
        torn = self.stats.torn_files + self.stats.changed_files
        if torn and not self.allow_torn_files:
            shown = ", ".join(torn[:3]) + (f" and {len(torn) - 3} more" if len(torn) > 3 else "")
            raise SourceError(
                f"source {self.source_name!r}: {len(torn)} file(s) changed while tar read them "
                f"(shrunk ones are padded with zeros, others hold bytes of two versions): "
                f"{shown}; back up again when they are quiet, or set allow_torn_files: true to "
                "keep such copies"
            )

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
            names.close()
            # Asked here, while tar still reads the files, rather than after the stream (a
            # process start, about 3 ms, that ``tool_versions`` then finds made).
            _tar_version()
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


def _unquote(name: bytes) -> str:
    """The absolute path of a member named in a tar message (relative to '/', escape-quoted)."""
    raw = _TAR_ESCAPE_RE.sub(
        lambda m: bytes([int(m[1], 8) & 0xFF]) if len(m[1]) == 3 else _TAR_ESCAPES.get(m[1], m[1]),
        name,
    )
    return "/" + os.fsdecode(raw)


def _is_folder(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _tar_environment() -> dict[str, str]:
    """The tool environment with tar's messages in English (they are parsed for torn files),
    the character set for file names left as it is."""
    env = tool_environment()
    if "LC_ALL" in env:
        env.setdefault("LC_CTYPE", env.pop("LC_ALL"))
    env.pop("LANGUAGE", None)
    env["LC_MESSAGES"] = "C"
    return env


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
