"""``wal-receive``: WAL streamed from the server as it is written, for an RPO of about a second.

``pg_receivewal`` does the streaming: it is the server's own client for the replication
protocol (psycopg 3 does not speak it), it keeps up with every server version it ships with,
holds a permanent replication slot (so the server keeps WAL nobody has received), flushes every
write with ``--synchronous``, names the segment being filled ``<segment>.partial`` and renames
it when complete, and resumes from its folder, or from the slot's ``restart_lsn`` when the
folder is empty. This module supervises it around a local spool:

- every completed segment (and timeline history file) in the spool goes into the store through
  the engine exactly as ``wal-push`` sends it, and leaves the spool only once the store holds
  it (then the versions of its partial segment in the store, now superseded, are deleted);
- every ``interval`` seconds the partial segment, if it changed, is copied to a snapshot
  (without the zeros that fill the rest of it: fetching puts them back) and stored as a new version of ``<segment>.streamed``, which ``pg-pitr`` replays after the last
  complete segment: a lost server loses at most about ``interval`` of committed work;
- a receiver that exits (a restart of the server, a network cut) is started again after a
  pause; a slot that is missing or has lost WAL (``max_slot_wal_keep_size``) ends the service
  with that said, never a silent restart from a newer position;
- a store that is down leaves the segments in the spool; once ``max_spool_segments`` wait
  there, the receiver is stopped, so the slot holds the WAL on the server (up to
  ``max_slot_wal_keep_size``) until the store is back and the spool has drained.

The slot advances when ``pg_receivewal`` has flushed WAL into the spool, not when the store
holds it: the spool is the durable hand-over point, as Barman's is. Keep it on a disk that
survives a restart of the receiver's host (a persistent volume for a Kubernetes sidecar).
"""

from __future__ import annotations

import ctypes
import datetime as dt
import fcntl
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spark_backup.engine.cadence import utcnow
from spark_backup.errors import SourceError, StoreError, UsageError
from spark_backup.sources.base import CheckOutcome, Runtime
from spark_backup.sources.postgres.server import PostgresServer
from spark_backup.sources.postgres.settings import PostgresSource, PostgresWalReceive
from spark_backup.sources.postgres.wal import (
    RECEIVING_SUFFIX,
    STREAMED_PARTIAL,
    WAL_NAME_RE,
    archived_wal,
    newest_segment,
    push_partial,
    push_wal,
    signature_key,
    written_prefix,
)
from spark_backup.sources.postgres.walname import WalSegment, lsn_value

# The streaming receiver's check on the WAL archive asset (spec and result share it).
WAL_RECEIVER_CHECK = "wal_receiver"
DEFAULT_INTERVAL = 1.0
DEFAULT_MAX_SPOOL_SEGMENTS = 64
FIRST_RESTART_PAUSE = 1.0
MAX_RESTART_PAUSE = 30.0
STATUS_FILE = "status.json"
_PR_SET_PDEATHSIG = 1


@dataclass
class ReceiverStatus:
    """What the service has done so far; written to ``<spool>/status.json`` on each round."""

    source: str
    slot: str
    system_identifier: str = ""
    started_at: str = ""
    segments_stored: int = 0
    partials_stored: int = 0
    last_segment: str | None = None
    # When the store last held everything the receiver had flushed (segments and partial).
    caught_up_at: str | None = None
    pending_segments: int = 0
    receiver_restarts: int = 0
    receiver_running: bool = False
    paused_for_store: bool = False
    last_error: str | None = None
    gap: str | None = None
    events: list[str] = field(default_factory=list)


class WalReceiver:
    """The ``wal-receive`` service for one source."""

    def __init__(
        self,
        runtime: Runtime,
        source: PostgresSource,
        server: PostgresServer,
        spool: Path,
        slot: str,
        *,
        interval: float = DEFAULT_INTERVAL,
        max_spool_segments: int = DEFAULT_MAX_SPOOL_SEGMENTS,
        create_slot: bool = False,
        log: Callable[[str], None] = print,
    ):
        if not slot or not all(c.isalnum() or c == "_" for c in slot) or slot != slot.lower():
            raise UsageError(
                f"--slot {slot!r}: a replication slot name is lower-case letters, digits and _"
            )
        self.runtime = runtime
        self.source = source
        self.server = server
        self.spool = Path(os.path.abspath(spool))
        self.wal_folder = self.spool / "wal"
        self.slot = slot
        self.interval = interval
        self.max_spool_segments = max_spool_segments
        self.create_slot = create_slot
        self.log = log
        self.status = ReceiverStatus(source.name, slot)
        self._process: subprocess.Popen[str] | None = None
        self._uploaded_partial: tuple[str, int, int] | None = None
        self._receiver_log = self.spool / "pg_receivewal.log"
        self._log_offset = 0
        self.major = 0

    # --- the service --------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> ReceiverStatus:
        """Receive and store WAL until ``stop`` is set (SIGTERM, Ctrl-C); then store what the
        spool holds and return."""
        self.wal_folder.mkdir(parents=True, exist_ok=True)
        with self._exclusive():
            facts = self._server_facts()
            self.status.system_identifier = facts["system_identifier"]
            self.status.started_at = utcnow().isoformat()
            self._check_slot(facts)
            self.create_slot = False  # a slot dropped later is reported, never re-created
            self.major = int(facts["server_version_num"]) // 10000
            self.store_spool(final=False)
            self._check_gap(facts)
            pause = FIRST_RESTART_PAUSE
            next_start = 0.0
            try:
                while not stop.is_set():
                    paused = self.status.pending_segments >= self.max_spool_segments
                    self.status.paused_for_store = paused
                    if paused and self._process is not None:
                        self.log(
                            f"{self.status.pending_segments} segments wait for the store: "
                            "stopping the receiver, the slot keeps the WAL on the server"
                        )
                        self._stop_receiver()
                    if self._process is not None and self._process.poll() is not None:
                        self._receiver_ended()
                        next_start = time.monotonic() + pause
                        pause = min(pause * 2, MAX_RESTART_PAUSE)
                    if self._process is None and not paused and time.monotonic() >= next_start:
                        self._start_receiver()
                    elif self._process is not None and time.monotonic() - next_start > 60:
                        pause = FIRST_RESTART_PAUSE  # it has run for a while: start afresh
                    round_started = time.monotonic()
                    self.store_spool(final=False)
                    self._write_status()
                    # Rounds start every interval, however long storing took.
                    stop.wait(max(0.0, self.interval - (time.monotonic() - round_started)))
            finally:
                self._stop_receiver()
                with suppress(StoreError):
                    self.store_spool(final=True)
                self._write_status()
        return self.status

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        lock_path = self.spool / ".lock"
        handle = open(lock_path, "a+")  # noqa: SIM115 - closed below
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(
                    f"spool {self.spool} is in use by another wal-receive; one receiver per "
                    "spool and slot"
                ) from None
            yield
        finally:
            handle.close()

    def _server_facts(self) -> dict[str, str]:
        with closing(self.server.connect()) as conn, conn.cursor() as cursor:
            cursor.execute(
                "SELECT (SELECT system_identifier FROM pg_control_system())::text, "
                "current_setting('server_version_num'), "
                "(SELECT setting FROM pg_settings WHERE name = 'wal_segment_size')"
            )
            sysid, version, segment_size = cursor.fetchone()
        return {
            "system_identifier": sysid,
            "server_version_num": version,
            "wal_segment_size": segment_size,
        }

    def _slot_state(self) -> tuple[str, str | None, str | None] | None:
        with closing(self.server.connect()) as conn, conn.cursor() as cursor:
            cursor.execute(
                "SELECT slot_type, restart_lsn::text, wal_status FROM pg_replication_slots "
                "WHERE slot_name = %s",
                (self.slot,),
            )
            row = cursor.fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def _check_slot(self, facts: dict[str, str]) -> None:
        state = self._slot_state()
        if state is None and self.create_slot:
            with closing(self.server.connect()) as conn, conn.cursor() as cursor:
                # Reserved at once: WAL from now on is kept for the receiver.
                cursor.execute("SELECT pg_create_physical_replication_slot(%s, true)", (self.slot,))
            self.log(f"created physical replication slot {self.slot!r}")
            state = self._slot_state()
        if state is None:
            raise SourceError(
                f"source {self.source.name!r}: replication slot {self.slot!r} does not exist on "
                f"{self.server.where}; create it with wal-receive --create-slot (if it was "
                "dropped, WAL since then may be gone: take a new base backup after creating it)"
            )
        slot_type, _restart, wal_status = state
        if slot_type != "physical":
            raise SourceError(
                f"source {self.source.name!r}: replication slot {self.slot!r} is a "
                f"{slot_type} slot; wal-receive needs a physical one"
            )
        if wal_status == "lost":
            raise SourceError(
                f"source {self.source.name!r}: replication slot {self.slot!r} has lost WAL "
                "(more than max_slot_wal_keep_size was kept for it); the archive has a gap: "
                "drop and re-create the slot, then take a new base backup"
            )

    def _check_gap(self, facts: dict[str, str]) -> None:
        """Where the receiver will start (the spool's newest file, else the slot) against the
        archive's newest segment of this cluster: WAL in between is missing, and said so."""
        if any(self.wal_folder.iterdir()):
            return  # pg_receivewal resumes from the spool, which continues the archive
        state = self._slot_state()
        restart = state[1] if state else None
        if not restart:
            return
        size = int(facts["wal_segment_size"])
        entries = archived_wal(
            self.runtime.store_for(self.source), self.source.name, None, facts["system_identifier"]
        )
        newest = newest_segment(entries)
        if newest is None:
            return
        archived = WalSegment.from_name(newest.name, size)
        start = WalSegment(archived.timeline, lsn_value(restart) // size, size)
        if start.number > archived.number + 1:
            missing = archived.next()
            self.status.gap = missing.name
            self.log(
                f"GAP: the archive ends with {newest.name} and the slot starts at {restart}: "
                f"segments from {missing.name} on are not archived; recovery past them needs a "
                "new base backup"
            )

    # --- the receiver process -----------------------------------------------------------------

    def _start_receiver(self) -> None:
        binary = self.server.tool("pg_receivewal", self.major)
        args = [
            str(binary),
            "--directory",
            str(self.wal_folder),
            "--slot",
            self.slot,
            "--synchronous",
            "--no-loop",
            "--no-password",
            "--status-interval",
            "1",
            "--dbname",
            self.server.dsn(),
        ]
        with self.server.tool_environment() as env:
            # Its messages go to a file, not a pipe nobody reads while it runs (a full pipe
            # would stop it); the lines of its last run say why it ended.
            self._log_offset = (
                self._receiver_log.stat().st_size if self._receiver_log.exists() else 0
            )
            with open(self._receiver_log, "a", encoding="utf-8") as log_file:
                self._process = subprocess.Popen(
                    args,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=log_file,
                    text=True,
                    preexec_fn=_die_with_parent,
                )
            # The passfile may go once the connection is made: wait for it (or an early exit).
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self._process.poll() is None:
                if self._slot_active():
                    break
                time.sleep(0.1)
        self.status.receiver_running = self._process.poll() is None
        if self.status.receiver_running:
            self.log(f"receiving WAL of {self.source.name!r} through slot {self.slot!r}")

    def _slot_active(self) -> bool:
        try:
            with closing(self.server.connect()) as conn, conn.cursor() as cursor:
                cursor.execute(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)
                )
                row = cursor.fetchone()
        except SourceError:
            return False
        return bool(row and row[0])

    def _receiver_ended(self) -> None:
        process = self._process
        assert process is not None
        with open(self._receiver_log, encoding="utf-8", errors="replace") as log_file:
            log_file.seek(self._log_offset)
            errors = log_file.read().strip().splitlines()
        self._process = None
        self.status.receiver_running = False
        self.status.receiver_restarts += 1
        reason = next(
            (line for line in reversed(errors) if "error" in line.lower()),
            errors[-1] if errors else f"exit {process.returncode}",
        )
        self.status.last_error = reason
        self.log(f"pg_receivewal ended ({reason}); starting it again")
        if "does not exist" in reason and "slot" in reason:
            raise SourceError(
                f"source {self.source.name!r}: replication slot {self.slot!r} is gone "
                f"({reason}); re-create it with --create-slot and take a new base backup"
            )
        try:
            state = self._slot_state()
        except SourceError:
            return  # the server is not there (a restart, a crash): try again later
        if state is None or state[2] == "lost":
            self._check_slot({})

    def _stop_receiver(self) -> None:
        process, self._process = self._process, None
        self.status.receiver_running = False
        if process is None or process.poll() is not None:
            return
        process.terminate()  # pg_receivewal flushes what it has and exits
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    # --- the spool into the store -------------------------------------------------------------

    def store_spool(self, final: bool) -> None:
        """Store every completed file in the spool, then the partial segment if it changed."""
        store = self.runtime.store_for(self.source)
        lock = store.default_lock.lock_from(utcnow()) if store.default_lock else None
        sysid = self.status.system_identifier
        completed = sorted(
            p
            for p in self.wal_folder.iterdir()
            if WAL_NAME_RE.match(p.name) and not p.name.endswith(RECEIVING_SUFFIX) and p.is_file()
        )
        self.status.pending_segments = len(completed)
        for path in completed:
            try:
                push_wal(
                    store,
                    self.source.name,
                    path,
                    self.runtime.recipients(),
                    self.runtime.compression(self.source),
                    lock,
                    self.runtime.signer(),
                    system_identifier=sysid,
                )
            except StoreError as exc:
                self.status.last_error = str(exc)
                self.log(f"store unreachable, {path.name} stays in the spool: {exc}")
                return
            self._forget_partials(store, path.name)
            path.unlink()
            _fsync_folder(self.wal_folder)
            self.status.pending_segments -= 1
            self.status.segments_stored += 1
            self.status.last_segment = path.name
        partials = sorted(self.wal_folder.glob(f"*{RECEIVING_SUFFIX}"))
        if partials:
            self._store_partial(store, lock, partials[-1])
        self.status.caught_up_at = utcnow().isoformat()

    def _store_partial(self, store, lock, path: Path) -> None:  # type: ignore[no-untyped-def]
        try:
            stat = path.stat()
        except FileNotFoundError:
            return  # renamed to the completed segment meanwhile: next round stores it
        seen = (path.name, stat.st_size, stat.st_mtime_ns)
        if seen == self._uploaded_partial:
            return
        snapshots = self.spool / "snapshot"
        snapshots.mkdir(exist_ok=True)
        snapshot = snapshots / path.name
        try:
            written_prefix(path, snapshot)
        except FileNotFoundError:
            return
        try:
            stored = push_partial(
                store,
                self.source.name,
                snapshot,
                path.name.removesuffix(RECEIVING_SUFFIX) + STREAMED_PARTIAL,
                self.status.system_identifier,
                self.runtime.recipients(),
                self.runtime.compression(self.source),
                lock,
                self.runtime.signer(),
            )
        except StoreError as exc:
            self.status.last_error = str(exc)
            self.log(f"store unreachable, partial segment {path.name} not stored: {exc}")
            return
        finally:
            snapshot.unlink(missing_ok=True)
        self._uploaded_partial = seen
        if stored is not None:
            self.status.partials_stored += 1

    def _forget_partials(self, store, segment: str) -> None:  # type: ignore[no-untyped-def]
        """The complete segment is stored: its partial versions serve nothing any more."""
        now = dt.datetime.now(dt.UTC)
        for entry in archived_wal(
            store, self.source.name, segment + STREAMED_PARTIAL, self.status.system_identifier
        ):
            if entry.system_identifier and not store.locked(entry.key, now):
                with suppress(StoreError):
                    store.delete(entry.key)
                    if store.exists(signature_key(entry.key)):
                        store.delete(signature_key(entry.key))

    def _write_status(self) -> None:
        path = self.spool / STATUS_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self.status), indent=2))
        os.replace(temporary, path)


@dataclass(frozen=True)
class ReceiverSlot:
    """The server's view of a ``wal-receive`` service: its slot."""

    name: str
    active: bool
    wal_status: str | None
    retained_bytes: int | None

    def problem(self, source: str) -> str | None:
        if self.wal_status == "lost":
            return (
                f"wal-receive slot {self.name!r} of {source!r} has lost WAL "
                "(max_slot_wal_keep_size): the streamed archive has a gap"
            )
        if not self.active:
            return (
                f"wal-receive slot {self.name!r} of {source!r} is not in use: streaming has "
                f"stopped, the server keeps {self.retained_bytes or 0} bytes of WAL for it"
            )
        return None


def receiver_slot(
    server: PostgresServer, source: str, slot: str | None = None
) -> ReceiverSlot | None:
    """The ``wal-receive`` slot of ``source`` on the server (``slot``, else the default one),
    if there is one."""
    slot = slot or default_slot(source)
    with closing(server.connect()) as conn, conn.cursor() as cursor:
        cursor.execute(
            "SELECT active, wal_status, (pg_current_wal_lsn() - restart_lsn)::bigint "
            "FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        )
        row = cursor.fetchone()
    return None if row is None else ReceiverSlot(slot, bool(row[0]), row[1], row[2])


def receiver_check(runtime: Runtime, source: PostgresSource, now: dt.datetime) -> CheckOutcome:
    """The ``wal_receiver`` check: the receiver is streaming (its slot is in use and has lost
    nothing) and the store is at most ``wal_receive.max_lag`` behind what the server wrote.

    The store's lag: where the receiver's spool is readable here, the time since its last
    round that left nothing unstored (``caught_up_at``: exact, and an idle server is not
    behind); elsewhere zero when the receiver holds everything the server wrote and the store
    reaches the segment of the slot's flush position (a partial segment there may lag by up to
    its interval), else the age of the newest streamed WAL in the store."""
    settings = source.wal_receive or PostgresWalReceive()
    slot = settings.slot or default_slot(source.name)
    bound = settings.max_lag
    metadata: dict[str, Any] = {"slot": slot, "max_lag_seconds": bound.total_seconds()}
    server = PostgresServer.from_source(source, runtime.context(source))
    try:
        with closing(server.connect()) as conn, conn.cursor() as cursor:
            cursor.execute(
                "SELECT s.active, s.wal_status, r.flush_lsn::text, "
                "(pg_current_wal_lsn() - coalesce(r.flush_lsn, s.restart_lsn))::bigint, "
                "extract(epoch FROM r.flush_lag)::float8, pg_walfile_name(pg_current_wal_lsn()), "
                "(SELECT system_identifier FROM pg_control_system())::text, "
                "(SELECT setting FROM pg_settings WHERE name = 'wal_segment_size')::bigint "
                "FROM pg_replication_slots s LEFT JOIN pg_stat_replication r "
                "ON r.pid = s.active_pid WHERE s.slot_name = %s",
                (slot,),
            )
            row = cursor.fetchone()
    except SourceError as exc:
        return CheckOutcome(False, f"server of {source.name!r} not reachable: {exc}", metadata)
    if row is None:
        return CheckOutcome(
            False,
            f"wal-receive slot {slot!r} of {source.name!r} does not exist: nothing streams",
            metadata,
        )
    active, wal_status, flush_lsn, behind, flush_lag, current, sysid, segment_size = row
    metadata.update(
        active=bool(active),
        wal_status=wal_status or "",
        behind_bytes=int(behind or 0),
        flush_lag_seconds=round(flush_lag or 0.0, 3),
    )
    entries = [
        entry
        for entry in archived_wal(runtime.store_for(source), source.name, None, sysid)
        if entry.is_segment or entry.is_partial
    ]
    newest = max(entries, key=lambda entry: entry.modified, default=None)
    metadata["newest_stored"] = newest.name if newest else ""
    lag = None if newest is None else max(now - newest.modified, dt.timedelta(0))
    caught_up = _caught_up_at(runtime, source, settings)
    if caught_up is not None:
        # Every round that leaves nothing unstored moves it, on an idle server too.
        lag = max(now - caught_up, dt.timedelta(0))
        metadata["caught_up_at"] = caught_up.isoformat()
    elif newest is not None and flush_lsn and not behind:
        size = int(segment_size)
        flushed = WalSegment.from_lsn(flush_lsn, int(current[:8], 16), size)
        if lsn_value(flush_lsn) % size == 0:
            flushed = flushed.previous()  # the segment before is complete, the next empty
        reached = max(WalSegment.from_name(e.name, size).number for e in entries)
        if reached >= flushed.number:
            lag = dt.timedelta(0)
    if lag is not None:
        metadata["lag_seconds"] = round(lag.total_seconds(), 1)
    problem = ReceiverSlot(slot, bool(active), wal_status, int(behind or 0)).problem(source.name)
    if problem:
        return CheckOutcome(False, problem, metadata)
    if lag is None:
        return CheckOutcome(False, f"no streamed WAL of {source.name!r} is in the store", metadata)
    description = (
        f"wal-receive of {source.name!r} streams through slot {slot!r}: the store is "
        f"{lag.total_seconds():.1f} s behind (bound {bound.total_seconds():.0f} s), the "
        f"receiver {int(behind or 0)} bytes"
    )
    return CheckOutcome(lag <= bound, description, metadata)


def _caught_up_at(
    runtime: Runtime, source: PostgresSource, settings: PostgresWalReceive
) -> dt.datetime | None:
    if not settings.spool:
        return None
    try:
        status = read_status(runtime.context(source).resolve(settings.spool))
    except (UsageError, OSError, ValueError):
        return None
    value = status.get("caught_up_at")
    return dt.datetime.fromisoformat(value) if isinstance(value, str) else None


def default_slot(source: str) -> str:
    return "spark_backup_" + "".join(c if c.isalnum() else "_" for c in source.lower())


def read_status(spool: Path) -> dict[str, object]:
    try:
        return json.loads((spool / STATUS_FILE).read_text())
    except FileNotFoundError:
        raise UsageError(f"{spool} holds no wal-receive status (has it run?)") from None


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _die_with_parent() -> None:
    """In the receiver's child: end with the service, even one killed with -9."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def serve(
    runtime: Runtime,
    source: PostgresSource,
    server: PostgresServer,
    spool: Path,
    slot: str,
    **options: object,
) -> ReceiverStatus:
    """Run the service until SIGTERM or SIGINT."""
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    receiver = WalReceiver(runtime, source, server, spool, slot, **options)  # type: ignore[arg-type]
    return receiver.run(stop)
