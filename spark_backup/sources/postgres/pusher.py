"""``wal-pusher``: asynchronous, parallel WAL archiving, as pgBackRest's ``archive-async``.

The server's ``archive_command`` is ``archive_handoff.sh`` (POSIX sh, no interpreter to start):
it writes the WAL file's path into ``<spool>/requests/<name>`` and waits until the pusher
acknowledges it in ``<spool>/acked/<name>``. The pusher, a resident service, stores each
requested file through the engine exactly as ``wal-push`` does, and also reads ahead: every
file the server has marked ready (``pg_wal/archive_status/<name>.ready``), several at once
(``parallel``), so that the server's call for it finds its acknowledgement waiting.

What is never lost:

- an acknowledgement is written only after the store holds the object and its signature
  (``push_wal`` returned), so ``archive_command`` exits 0 only for a durable file; the spool
  holds paths, never the only copy of WAL: the server keeps the file until that exit 0;
- a store that fails touches ``<spool>/failing``, and ``archive_command`` fails at once (the
  server keeps the file and calls again; the pusher retries every ``RETRY_PAUSE``);
- no pusher (killed, never started) holds ``<spool>/.lock``: ``archive_command`` fails at once;
- a pusher killed with -9 mid-upload has acknowledged nothing of that file: the server's next
  call hands it to the next pusher, and ``push_wal`` is idempotent (same name, same content).

The pusher reads the files in ``pg_wal``, so it runs as the server's OS user (or root).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from spark_backup.engine.cadence import utcnow
from spark_backup.errors import SparkBackupError, UsageError
from spark_backup.sources.base import Runtime
from spark_backup.sources.postgres.settings import PostgresSource, PostgresWalPusher
from spark_backup.sources.postgres.wal import WAL_NAME_RE, push_wal

HANDOFF_SCRIPT = "archive-handoff.sh"
REQUESTS = "requests"
ACKED = "acked"
FAILING = "failing"
LOCK = ".lock"
STATUS_FILE = "pusher-status.json"
POLL_SECONDS = 0.01
RETRY_PAUSE = 1.0
LOCK_WAIT = 5.0
# An acknowledgement the server has not asked for in this long is of a file archived some
# other way (or of a cluster gone): it is dropped, the file would be pushed again if asked.
STALE_ACK_SECONDS = 3600.0
ACKED_NAMES_KEPT = 100_000


def spool_of(runtime: Runtime, source: PostgresSource) -> Path:
    return runtime.context(source).resolve(pusher_settings(source).spool)


def pusher_settings(source: PostgresSource) -> PostgresWalPusher:
    if source.wal_pusher is None:
        raise UsageError(
            f"source {source.name!r} has no wal_pusher in the plan (wal_pusher: spool: PATH)"
        )
    return source.wal_pusher


def archive_command(spool: Path, settings: PostgresWalPusher) -> str:
    """The server's ``archive_command`` for asynchronous archiving through ``spool``."""
    import shlex

    quoted = shlex.quote(str(spool))
    return f"/bin/sh {shlex.quote(str(spool / HANDOFF_SCRIPT))} {quoted} {settings.ack_timeout} %p"


def prepare_spool(spool: Path) -> None:
    """The spool's folders and the hand-off script, owned by the spool's owner (the server's
    OS user writes requests and consumes acknowledgements, even when root runs the pusher)."""
    spool.mkdir(parents=True, exist_ok=True)
    owner = spool.stat()
    for folder in (spool / REQUESTS, spool / ACKED):
        folder.mkdir(exist_ok=True)
        _give(folder, owner)
    script = spool / HANDOFF_SCRIPT
    text = resources.files(__package__).joinpath("archive_handoff.sh").read_text()
    if not script.is_file() or script.read_text() != text:
        temporary = spool / f".{HANDOFF_SCRIPT}.tmp"
        temporary.write_text(text)
        os.chmod(temporary, 0o755)
        _give(temporary, owner)
        os.replace(temporary, script)
    lock = spool / LOCK
    lock.touch(exist_ok=True)
    _give(lock, owner)


def _give(path: Path, owner: os.stat_result) -> None:
    status = path.stat()
    if os.geteuid() == 0 and (status.st_uid, status.st_gid) != (owner.st_uid, owner.st_gid):
        os.chown(path, owner.st_uid, owner.st_gid)


@dataclass
class PusherStatus:
    """What the service has done; written to ``<spool>/pusher-status.json`` every second."""

    source: str
    parallel: int
    started_at: str = ""
    pushed: int = 0
    already_archived: int = 0
    in_flight: int = 0
    last_pushed: str | None = None
    last_pushed_at: str | None = None
    last_error: str | None = None
    failing: bool = False


class WalPusher:
    """The ``wal-pusher`` service for one source."""

    def __init__(
        self,
        runtime: Runtime,
        source: PostgresSource,
        spool: Path,
        parallel: int,
        log: Callable[[str], None] = print,
    ):
        self.runtime = runtime
        self.source = source
        self.spool = Path(os.path.abspath(spool))
        self.parallel = parallel
        self.log = log
        self.status = PusherStatus(source.name, parallel)
        self.store = runtime.store_for(source)
        # pg_wal folders seen in requests: where the server marks files ready (read-ahead).
        self.wal_folders: set[Path] = set()
        self._in_flight: dict[str, Future[str]] = {}
        self._retry_at: dict[str, float] = {}
        # Names acknowledged in this run: never read ahead again (between the server's call
        # and its .done mark the file still looks ready, and once done it may be recycled).
        self._acked_names: dict[str, None] = {}

    def run(self, stop: threading.Event) -> PusherStatus:
        prepare_spool(self.spool)
        with self._exclusive(), ThreadPoolExecutor(self.parallel) as pool:
            self.status.started_at = utcnow().isoformat()
            # Acknowledgements of an earlier run are dropped: the server asks again, and the
            # file is pushed again (idempotent), rather than trusting what this run did not see.
            for entry in os.scandir(self.spool / ACKED):
                with suppress(FileNotFoundError):
                    os.unlink(entry.path)
            (self.spool / FAILING).unlink(missing_ok=True)
            self.log(
                f"wal-pusher of {self.source.name!r}: spool {self.spool}, {self.parallel} at once"
            )
            last_status = 0.0
            last_sweep = time.monotonic()
            while not stop.is_set():
                self._collect()
                self._submit(pool)
                now = time.monotonic()
                if now - last_status >= 1.0:
                    self._write_status()
                    last_status = now
                if now - last_sweep >= 60:
                    self._sweep_acks()
                    last_sweep = now
                stop.wait(POLL_SECONDS)
            for future in list(self._in_flight.values()):
                with suppress(Exception):
                    future.result()
            self._collect()
            self._write_status()
        return self.status

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        # The hand-off script probes this lock with a shared one for a moment: wait it out.
        handle = open(self.spool / LOCK, "a+")  # noqa: SIM115 - closed below
        try:
            deadline = time.monotonic() + LOCK_WAIT
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise UsageError(
                            f"spool {self.spool} is in use by another wal-pusher; one pusher "
                            "per spool"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            handle.close()

    # --- what to push ---------------------------------------------------------------------------

    def _wanted(self) -> dict[str, Path]:
        """Requested files first (the server waits for them), then those marked ready."""
        wanted: dict[str, Path] = {}
        for entry in os.scandir(self.spool / REQUESTS):
            if not WAL_NAME_RE.match(entry.name):
                continue
            try:
                with open(entry.path, encoding="utf-8") as handle:
                    path = Path(handle.read().strip())
            except FileNotFoundError:
                continue
            if path.name != entry.name or not path.is_absolute():
                continue
            wanted[entry.name] = path
            self.wal_folders.add(path.parent)
        acked = set(os.listdir(self.spool / ACKED))
        for folder in self.wal_folders:
            try:
                ready = sorted(
                    e.name[: -len(".ready")]
                    for e in os.scandir(folder / "archive_status")
                    if e.name.endswith(".ready")
                )
            except OSError:
                continue
            for name in ready:
                if WAL_NAME_RE.match(name) and name not in acked and name not in self._acked_names:
                    wanted.setdefault(name, folder / name)
        return wanted

    def _submit(self, pool: ThreadPoolExecutor) -> None:
        now = time.monotonic()
        for name, path in self._wanted().items():
            if len(self._in_flight) >= self.parallel:
                break
            if name in self._in_flight or self._retry_at.get(name, 0) > now:
                continue
            if (self.spool / ACKED / name).exists():
                continue
            self._in_flight[name] = pool.submit(self._push, path)
        self.status.in_flight = len(self._in_flight)

    def _push(self, path: Path) -> str:
        lock = self.store.default_lock
        return push_wal(
            self.store,
            self.source.name,
            path,
            self.runtime.recipients(),
            self.runtime.compression(self.source),
            lock.lock_from(utcnow()) if lock else None,
            self.runtime.signer(),
        )

    def _collect(self) -> None:
        for name, future in list(self._in_flight.items()):
            if not future.done():
                continue
            del self._in_flight[name]
            try:
                outcome = future.result()
            except (SparkBackupError, OSError) as exc:
                if not self._pending_path(name):
                    # Archived and recycled by the server meanwhile: nobody waits for it.
                    (self.spool / REQUESTS / name).unlink(missing_ok=True)
                    continue
                self._failed(name, exc)
                continue
            self._acknowledge(name)
            self._retry_at.pop(name, None)
            if outcome == "already archived":
                self.status.already_archived += 1
            else:
                self.status.pushed += 1
            self.status.last_pushed = name
            self.status.last_pushed_at = utcnow().isoformat()
        self.status.in_flight = len(self._in_flight)

    def _pending_path(self, name: str) -> bool:
        """Whether the file ``name`` is still there to be archived (requested or ready)."""
        request = self.spool / REQUESTS / name
        with suppress(OSError):
            return Path(request.read_text().strip()).is_file()
        return any((folder / name).is_file() for folder in self.wal_folders)

    def _acknowledge(self, name: str) -> None:
        """The store holds ``name``: say so to the server's call, then forget the request."""
        temporary = self.spool / ACKED / f".{name}.tmp"
        temporary.write_bytes(b"")
        os.replace(temporary, self.spool / ACKED / name)
        (self.spool / REQUESTS / name).unlink(missing_ok=True)
        self._acked_names[name] = None
        if len(self._acked_names) > ACKED_NAMES_KEPT:
            del self._acked_names[next(iter(self._acked_names))]
        if self.status.failing:
            self.status.failing = False
            (self.spool / FAILING).unlink(missing_ok=True)
            self.log("the store takes WAL again")

    def _failed(self, name: str, exc: BaseException) -> None:
        """Tried again after a pause; a file the server waits for makes its call fail now."""
        self._retry_at[name] = time.monotonic() + RETRY_PAUSE
        if not (self.spool / REQUESTS / name).exists():
            return  # read ahead: the server's own call for it pushes it and hears the error
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not self.status.failing or message != self.status.last_error:
            self.log(f"{name} not stored, the server keeps it: {message}")
        self.status.failing = True
        self.status.last_error = message
        # The status first: whoever sees the marker also reads the failure in --status.
        self._write_status()
        temporary = self.spool / f".{FAILING}.tmp"
        temporary.write_text(f"{name}: {message}\n")
        os.replace(temporary, self.spool / FAILING)

    def _sweep_acks(self) -> None:
        cutoff = time.time() - STALE_ACK_SECONDS
        for entry in os.scandir(self.spool / ACKED):
            with suppress(FileNotFoundError):
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)

    def _write_status(self) -> None:
        path = self.spool / STATUS_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self.status), indent=2))
        os.replace(temporary, path)


def read_status(spool: Path) -> dict[str, object]:
    try:
        return json.loads((spool / STATUS_FILE).read_text())
    except FileNotFoundError:
        raise UsageError(f"{spool} holds no wal-pusher status (has it run?)") from None


def serve(
    runtime: Runtime, source: PostgresSource, log: Callable[[str], None] = print
) -> PusherStatus:
    """Run the service until SIGTERM or SIGINT."""
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    settings = pusher_settings(source)
    pusher = WalPusher(runtime, source, spool_of(runtime, source), settings.parallel, log)
    return pusher.run(stop)
