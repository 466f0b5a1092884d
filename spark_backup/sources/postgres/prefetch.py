"""WAL fetched in parallel ahead of replay, for ``pg-pitr`` (as pgBackRest's asynchronous
``archive-get`` queue and WAL-G's prefetch do).

``pg-pitr`` knows before the server starts which WAL files recovery may read (``wal_to_fetch``:
the history files and the segments from the base backup's start to the first gap). A
``WalPrefetch`` fetches them into the recovery's WAL folder with a few threads, each with its
own ``age_worker`` process, in replay order and at most ``ahead`` segments beyond the one the
server asked for last: the disk holds a bounded window, never the whole archive. It starts
while the base backup is still being restored, so fetching, restoring and replay overlap.

The server's ``restore_command`` is a small shell script (no Python, no plan, no key) that
talks to it through files in the folder:

* ``.wanted``: every name the archive can give, one a line. A name not in it (a timeline
  history that does not exist, the segment after the end of the archive) exits 1 at once:
  the end of the WAL.
* ``.asked``: the name the server asked for last (written by the script): segments before it
  are deleted; one asked again after its deletion is fetched again.
* ``<name>``: a fetched file appears only complete, checked (sha256, age's authentication and
  the signature, as ``wal-fetch`` checks) and readable by the server's user; the script copies
  it to ``%p``.
* ``<name>.failed``: written when that file's fetch failed (a damaged, forged or vanished
  object): asked for it, the script exits 255, which aborts recovery; the file is never handed
  over. A file past the recovery target that the server never asks for fails nothing. The
  script also exits 255 when ``pg-pitr``'s process is gone, so that a killed ``pg-pitr`` never
  leaves the server waiting for ever.
"""

from __future__ import annotations

import os
import pwd
import shlex
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from spark_backup.sources.postgres.wal import STREAMED_PARTIAL, ArchivedWal

WANTED_FILE = ".wanted"
ASKED_FILE = ".asked"
FAILED_SUFFIX = ".failed"
INCOMING_FOLDER = ".incoming"
SCRIPT_FILE = "restore_wal.sh"
# Fetching threads (each with its own decrypting process): on two cores, three keep both busy
# while one thread waits for the store.
PREFETCH_WORKERS = 3
# Segments fetched beyond the one the server reads: 16 MB each by default, so the window holds
# at most about 512 MB, and replay (about 100 MB/s here) rarely waits.
PREFETCH_AHEAD = 32
_POLL_SECONDS = 0.02

# Fetch one archived file to a path (complete and checked when it returns, else raises).
Fetch = Callable[[ArchivedWal, Path], None]


def served_name(entry: ArchivedWal) -> str:
    """The name the server asks for: a streamed partial segment is replayed as the segment it
    begins."""
    return entry.name.removesuffix(STREAMED_PARTIAL)


def restore_script(folder: Path, owner_pid: int) -> str:
    """The ``restore_command`` script: exit 0 with the file copied, 1 for a file the archive
    does not have, 255 (abort recovery) for a failed fetch or a copy that failed."""
    quoted = shlex.quote(str(folder))
    return f"""#!/bin/sh
# spark-backup pg-pitr: serves the WAL that pg-pitr (process {owner_pid}) fetches ahead.
dir={quoted}
grep -qxF "$1" "$dir/{WANTED_FILE}" || exit 1
printf '%s\\n' "$1" > "$dir/{ASKED_FILE}.tmp" && mv -f "$dir/{ASKED_FILE}.tmp" "$dir/{ASKED_FILE}" || exit 255
while :; do
  if [ -e "$dir/$1" ]; then cp "$dir/$1" "$2" && exit 0; exit 255; fi
  [ -e "$dir/$1{FAILED_SUFFIX}" ] && exit 255
  [ -d /proc/{owner_pid} ] || exit 255
  sleep {_POLL_SECONDS * 2:g}
done
"""


class WalPrefetch:
    """Fetches ``entries`` (in replay order) into ``folder`` ahead of the server; see the module
    docstring. Use as a context manager: the threads stop at its end. ``failures``: the fetches
    that failed, by name (the others go on: the server may never need those files); ``seconds_waited`` the time the server waited for a file not yet there;
    ``fetched`` how many files were fetched."""

    def __init__(
        self,
        entries: list[ArchivedWal],
        folder: Path,
        fetch: Fetch,
        os_user: str | None,
        *,
        workers: int | None = None,
        ahead: int | None = None,
    ):
        self.entries = entries
        self.folder = folder
        self.fetch = fetch
        self.ahead = max(PREFETCH_AHEAD if ahead is None else ahead, 1)
        self.workers = max(PREFETCH_WORKERS if workers is None else workers, 1)
        self.owner = pwd.getpwnam(os_user) if os_user else None
        self.index = {served_name(entry): number for number, entry in enumerate(entries)}
        self.state = ["todo"] * len(entries)  # todo, busy, done, removed, failed
        self.asked = -1
        self.asked_since: float | None = None
        self.failures: dict[str, Exception] = {}
        self.fetched = 0
        self.seconds_waited = 0.0
        self.seconds_fetching = 0.0
        self._changed = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []

    @property
    def script(self) -> Path:
        return self.folder / SCRIPT_FILE

    def __enter__(self) -> WalPrefetch:
        incoming = self.folder / INCOMING_FOLDER
        incoming.mkdir(parents=True)
        wanted = self.folder / WANTED_FILE
        wanted.write_text("".join(f"{name}\n" for name in self.index))
        wanted.chmod(0o644)
        self.script.write_text(restore_script(self.folder, os.getpid()))
        self.script.chmod(0o755)
        self._give(self.folder)  # the script writes .asked in it
        self._threads = [
            threading.Thread(target=self._work, name=f"wal-prefetch-{n}", daemon=True)
            for n in range(min(self.workers, max(len(self.entries), 1)))
        ]
        self._threads.append(threading.Thread(target=self._follow, name="wal-prefetch-follow"))
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        for thread in self._threads:
            thread.join()

    def refused(self) -> Exception | None:
        """Why the file the server asked for last could not be given to it, if it could not."""
        try:
            name = (self.folder / ASKED_FILE).read_text().strip()
        except OSError:
            return None
        with self._changed:
            return self.failures.get(name)

    def _give(self, path: Path) -> None:
        if self.owner:
            os.lchown(path, self.owner.pw_uid, self.owner.pw_gid)

    def _follow(self) -> None:
        with self._changed:
            while not self._stopping:
                if self._read_asked():
                    self._changed.notify_all()
                self._changed.wait(_POLL_SECONDS)

    def _work(self) -> None:
        while True:
            with self._changed:
                number = self._next()
                while number is None and not self._stopping:
                    self._changed.wait()
                    number = self._next()
                if self._stopping:
                    return
                self.state[number] = "busy"
            entry = self.entries[number]
            name = served_name(entry)
            staged = self.folder / INCOMING_FOLDER / name
            started = time.monotonic()
            try:
                self.fetch(entry, staged)
                # Readable by the server's user before the script can see it.
                self._give(staged)
                staged.chmod(0o640)
                os.replace(staged, self.folder / name)
            except Exception as exc:
                # The caller reports it if the server needed the file; it is never served.
                failed = self.folder / f"{name}{FAILED_SUFFIX}"
                failed.write_text(f"{exc}\n")
                failed.chmod(0o644)
                with self._changed:
                    self.state[number] = "failed"
                    self.failures[name] = exc
                    self._changed.notify_all()
                continue
            with self._changed:
                self.state[number] = "done"
                self.fetched += 1
                self.seconds_fetching += time.monotonic() - started
                if number == self.asked and self.asked_since is not None:
                    self.seconds_waited += time.monotonic() - self.asked_since
                    self.asked_since = None
                self._changed.notify_all()

    def _next(self) -> int | None:
        """The first file still to fetch within the window, if any."""
        limit = max(self.asked, 0) + self.ahead
        for number in range(len(self.entries)):
            if number > limit:
                return None
            if self.state[number] == "todo":
                return number
        return None

    def _read_asked(self) -> bool:
        """Follow the server: delete the segments before the one it asked for last, and fetch
        again one it asks for after its deletion. True if it asked for another file."""
        try:
            name = (self.folder / ASKED_FILE).read_text().strip()
        except OSError:
            return False
        number = self.index.get(name)
        if number is None or number == self.asked:
            return False
        self.asked = number
        if self.state[number] == "removed":
            self.state[number] = "todo"
        self.asked_since = time.monotonic() if self.state[number] != "done" else None
        for older in range(number):
            entry = self.entries[older]
            if self.state[older] == "done" and (entry.is_segment or entry.is_partial):
                (self.folder / served_name(entry)).unlink(missing_ok=True)
                self.state[older] = "removed"
        return True
