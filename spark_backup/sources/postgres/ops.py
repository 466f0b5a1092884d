"""PostgreSQL's own operations over a plan: WAL push and fetch, the archive's lag, archiving
settings, restore into a database, and point-in-time recovery. They reach stores and keys
through the ``Runtime`` (the service), shared by the command line and the Dagster layer."""

from __future__ import annotations

import datetime as dt
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyrage import x25519

from spark_backup.engine.cadence import utcnow
from spark_backup.engine.processes import first_error, tool_environment
from spark_backup.engine.signing import Verifier
from spark_backup.engine.stores.base import ObjectStore
from spark_backup.engine.streams import ProgressCallback
from spark_backup.errors import (
    IntegrityError,
    SourceError,
    SparkBackupError,
    StoreError,
    UsageError,
)
from spark_backup.sources.base import CopyRef, Runtime, SourceKind, source_of_kind
from spark_backup.sources.postgres.parts import BASE, BASE_PART
from spark_backup.sources.postgres.pitr_options import DEFAULT_PORT
from spark_backup.sources.postgres.settings import PostgresSource
from spark_backup.sources.postgres.wal import (
    ArchivedWal,
    WalDigest,
    archived_wal,
    expendable_wal,
    fetch_wal,
    is_wal_key,
    newest_segment,
    push_wal,
    signature_key,
    wal_file_system_identifier,
    wal_prefix,
)
from spark_backup.sources.postgres.walname import DEFAULT_SEGMENT_SIZE, WalSegment, lsn_value

# Recovery, its prefetch, the wal-pusher service and the pipeline's reading side load where they
# run: wal-push, run for every WAL segment, and list (the archive's ranges) need none of them.
if TYPE_CHECKING:
    from spark_backup.engine.age_worker import AgeWorker
    from spark_backup.sources.capability_values import LogRange
    from spark_backup.sources.postgres import pitr as recovery
    from spark_backup.sources.postgres.server import PostgresServer, ServerArchiveState

# A standby's wal-fetch asks an unreachable store again after these pauses (doubling).
WAL_FETCH_FIRST_PAUSE = 0.5
WAL_FETCH_MAX_PAUSE = 5.0


def postgres_source(runtime: Runtime, kind: SourceKind, name: str | None = None) -> PostgresSource:
    """The named PostgreSQL source, or the plan's only one when no name is given."""
    source = source_of_kind(runtime, kind, name)
    assert isinstance(source, PostgresSource)
    return source


def server_of(runtime: Runtime, source: PostgresSource) -> PostgresServer:
    from spark_backup.sources.postgres.server import PostgresServer

    return PostgresServer.from_source(source, runtime.context(source))


# --- WAL archive ------------------------------------------------------------------------------


def wal_push(
    runtime: Runtime,
    source: PostgresSource,
    path: Path,
    parallel: int = 1,
    digest: WalDigest | None = None,
) -> str:
    """Archive one WAL file. With ``parallel`` above 1, also the next segments the server has
    marked ready (``pg_wal/archive_status/*.ready``), several at once, as WAL-G does: each
    one stored is noted in ``pg_wal/spark_backup_status/``, so that the server's own
    ``archive_command`` for it, a moment later, only confirms that the store has it and
    returns. Nothing is acknowledged to the server before the store holds it. ``digest``:
    the sha256 of ``path``, started before the plan was read (``WalDigest``)."""
    store = runtime.store_for(source)
    lock = store.default_lock.lock_from(utcnow()) if store.default_lock else None

    def push(one: Path) -> str:
        return push_wal(
            store,
            source.name,
            one,
            runtime.recipients(),
            runtime.compression(source),
            lock,
            runtime.signer(),
            digest=digest if one == path else None,
        )

    notes = path.parent / PUSHED_AHEAD_FOLDER
    note = notes / path.name
    if note.is_file():
        key = note.read_text().strip()
        note.unlink()
        if key and is_wal_key(key) and store.exists(key):
            return "archived ahead"
    ahead = _ready_after(path, parallel - 1)
    if not ahead:
        return push(path)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        mine = pool.submit(push, path)
        others = {one: pool.submit(_push_ahead, push, store, source.name, one) for one in ahead}
        outcome = mine.result()  # its failure is the server's to retry; the others' are not
        for one, future in others.items():
            key = future.result()
            if key:
                notes.mkdir(exist_ok=True)
                temporary = notes / f".{one.name}.tmp"
                temporary.write_text(key + "\n")
                os.replace(temporary, notes / one.name)
    return outcome


PUSHED_AHEAD_FOLDER = "spark_backup_status"


def _ready_after(path: Path, count: int) -> list[Path]:
    """Up to ``count`` segments after ``path`` that the server has marked ready to archive."""
    if count <= 0:
        return []
    status = path.parent / "archive_status"
    try:
        ready = sorted(
            entry.name.removesuffix(".ready")
            for entry in os.scandir(status)
            if entry.name.endswith(".ready")
        )
    except OSError:
        return []
    names = [n for n in ready if len(n) == 24 and n > path.name]
    return [path.parent / name for name in names[:count] if (path.parent / name).is_file()]


def _push_ahead(push: Any, store: ObjectStore, source: str, path: Path) -> str | None:
    """Push a segment ahead of the server's call; its key once stored, else None (the
    server's own call for it pushes it then, and reports any error)."""
    try:
        push(path)
    except SparkBackupError:
        return None
    versions = archived_wal(store, source, path.name, wal_file_system_identifier(path))
    return versions[0].key if len(versions) == 1 else None


def base_system_identifier(base: Any) -> str | None:
    """The cluster a base backup was taken from: its WAL is archived under that identifier."""
    found = base.source_metadata.get("system_identifier")
    return str(found) if found else None


def wal_receive(
    runtime: Runtime, source: PostgresSource, spool: Path, slot: str, **options: Any
) -> Any:
    """The ``wal-receive`` service (``receive.py``) until SIGTERM or SIGINT."""
    from spark_backup.sources.postgres import receive

    return receive.serve(runtime, source, server_of(runtime, source), spool, slot, **options)


def wal_pusher(runtime: Runtime, source: PostgresSource, log: Any) -> Any:
    """The ``wal-pusher`` service (``pusher.py``) until SIGTERM or SIGINT."""
    from spark_backup.sources.postgres import pusher

    return pusher.serve(runtime, source, log)


def wal_push_dry_run(runtime: Runtime, source: PostgresSource) -> str:
    """What ``wal-push`` needs, checked without archiving anything: the recipients, and a
    store this user may write the source's WAL into. Returns where it would go."""
    runtime.recipients()
    store = runtime.store_for(source)
    store.check_writable(wal_prefix(source.name))
    return f"{store.uri}/{wal_prefix(source.name)}"


def archive_command_as_server_user(
    server: PostgresServer, source: PostgresSource, timeout: float = 60.0
) -> str | None:
    """Run the server's own ``archive_command`` with ``--dry-run`` in place of the file, as
    the OS user the server runs as (we must be root to become it). Returns that user, or None
    when there is nothing to try: not root, archiving off, a command that is not wal-push, or a
    server on another machine (or whose data_directory this role may not read)."""
    from spark_backup.sources.postgres.server import server_settings

    if os.geteuid() != 0:
        return None
    settings = server_settings(server, ("archive_mode", "archive_command", "data_directory"))
    command = settings.get("archive_command") or ""
    if settings.get("archive_mode") == "off":
        return None
    # Only a server on this machine runs its archive_command here: its data folder is here.
    os_user = _data_directory_owner(settings.get("data_directory"))
    if os_user is None:
        return None
    from spark_backup.sources.postgres.pusher import HANDOFF_SCRIPT

    if source.wal_pusher is not None and HANDOFF_SCRIPT in command:
        return _handoff_as_server_user(command, source, os_user, timeout)
    if "wal-push" not in command:
        return None
    result = _shell_as(os_user, [command.replace("%p", "--dry-run")], source, timeout)
    if result.returncode in (126, 127):
        raise SourceError(
            f"source {source.name!r}: archive_command cannot start as OS user {os_user} (exit "
            f"{result.returncode}: {first_error(result.stderr.splitlines(), result.returncode)});"
            f" install spark-backup where {os_user} can run it, outside any home folder closed "
            "to it (README: PostgreSQL archiving)"
        )
    if result.returncode != 0:
        lines = result.stderr.splitlines()
        # A Python traceback says what went wrong on its last line.
        reason = lines[-1] if "Traceback" in result.stderr else first_error(lines, 1)
        raise SourceError(
            f"source {source.name!r}: archive_command fails as OS user {os_user}: {reason}"
        )
    return os_user


def _shell_as(
    os_user: str, script: list[str], source: PostgresSource, timeout: float
) -> subprocess.CompletedProcess[str]:
    """``sh -c SCRIPT [ARGS]`` as ``os_user``, with the server's kind of environment."""
    try:
        return subprocess.run(
            ["runuser", "-u", os_user, "--", "sh", "-c", *script],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=tool_environment(),
            cwd="/",
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SourceError(
            f"source {source.name!r}: cannot run archive_command as {os_user}: {exc}"
        ) from None


# The asynchronous archive_command's needs, checked as the server's user: one line why not.
_HANDOFF_PROBE = """
spool=$1
[ -r "$spool/archive-handoff.sh" ] || { echo "cannot read $spool/archive-handoff.sh"; exit 1; }
for folder in requests acked; do
  [ -w "$spool/$folder" ] || { echo "cannot write $spool/$folder"; exit 1; }
done
if flock -n -s "$spool/.lock" true 2>/dev/null; then
  echo "no wal-pusher is running on $spool: start it (spark-backup wal-pusher)"; exit 1
fi
"""


def _handoff_as_server_user(
    command: str, source: PostgresSource, os_user: str, timeout: float
) -> str:
    """The hand-off script's spool (from the server's own archive_command, as
    ``pusher.archive_command`` writes it), as ``os_user``: readable script, writable folders,
    and a pusher holding its lock (else every archive_command fails)."""
    from spark_backup.sources.postgres.pusher import HANDOFF_SCRIPT

    try:
        words = shlex.split(command)
    except ValueError:
        words = []
    if len(words) < 3 or not words[1].endswith(HANDOFF_SCRIPT):
        raise SourceError(
            f"source {source.name!r}: archive_command {command!r} is not the wal-pusher "
            "hand-off; set it with pg-setup-archiving"
        )
    result = _shell_as(os_user, [_HANDOFF_PROBE, "sh", words[2]], source, timeout)
    if result.returncode != 0:
        reason = (result.stdout.strip() or first_error(result.stderr.splitlines(), 1)).splitlines()
        raise SourceError(
            f"source {source.name!r}: archive_command fails as OS user {os_user}: {reason[0]}"
        )
    return os_user


def _data_directory_owner(data_directory: str | None) -> str | None:
    """The owner of the server's data folder, when the server runs on this machine."""
    if not data_directory:
        return None
    try:
        return pwd.getpwuid(os.stat(data_directory).st_uid).pw_name
    except (OSError, KeyError):
        return None


def wal_fetch(
    runtime: Runtime,
    source: PostgresSource,
    name: str,
    destination: Path,
    identity_file: str | Path | None = None,
    retry_for: float = 0.0,
) -> None:
    """Restore one WAL file. A store that cannot be reached is asked again for ``retry_for``
    seconds (a standby's brief store outage); a file not archived, damaged or with a refused
    signature is not retried."""
    store = runtime.store_for(source)
    identities = runtime.identities(identity_file)
    deadline = time.monotonic() + retry_for
    pause = WAL_FETCH_FIRST_PAUSE
    while True:
        try:
            fetch_wal(store, source.name, name, destination, identities, verifier=runtime.verifier)
            return
        except StoreError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise
        # The last attempt falls on the deadline: a standby waits the whole retry window.
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, WAL_FETCH_MAX_PAUSE)


@dataclass
class WalArchiveStatus:
    """The WAL archive's lag: how much committed work a loss of the server now would lose at
    most. Zero when everything the server has written is archived; otherwise the age of the
    newest archived segment (everything since may be lost)."""

    source: str
    rpo: dt.timedelta
    now: dt.datetime
    newest: ArchivedWal | None
    server: ServerArchiveState | None = None
    server_error: str | None = None
    # The slot of a wal-receive service streaming this source, if the server has one.
    receiver: Any = None

    @property
    def lag(self) -> dt.timedelta | None:
        if self.newest is None:
            return None
        age = max(self.now - self.newest.modified, dt.timedelta(0))
        server = self.server
        if server is None:
            return age
        if server.current_segment_archived(self.newest.name):
            return dt.timedelta(0)
        timeout = dt.timedelta(seconds=server.archive_timeout_seconds)
        if server.completed_segments_archived(self.newest.name) and (
            dt.timedelta(0) < timeout <= self.rpo
        ):
            # Only the open segment is missing, and the server closes it within archive_timeout
            # once it holds anything that matters; an idle server (which writes only records
            # that never force a switch) must not look as if it fell behind.
            return min(age, timeout)
        return age

    @property
    def receiver_problem(self) -> str | None:
        return self.receiver.problem(self.source) if self.receiver else None

    @property
    def ok(self) -> bool:
        return self.lag is not None and self.lag <= self.rpo and not self.receiver_problem


def wal_archive_status(
    runtime: Runtime, source: PostgresSource, now: dt.datetime | None = None
) -> WalArchiveStatus:
    """How far the WAL archive lags behind the server, against the source's RPO."""
    from spark_backup.sources.postgres.server import server_archive_state

    if not source.wal_archiving:
        raise UsageError(f"source {source.name!r} does not archive WAL (wal_archiving: false)")
    entries = archived_wal(runtime.store_for(source), source.name)
    status = WalArchiveStatus(
        source=source.name, rpo=source.rpo, now=now or utcnow(), newest=newest_segment(entries)
    )
    try:
        server = server_of(runtime, source)
        status.server = server_archive_state(server)
        from spark_backup.sources.postgres.receive import receiver_slot

        planned = source.wal_receive.slot if source.wal_receive else None
        status.receiver = receiver_slot(server, source.name, planned)
    except SparkBackupError as exc:
        status.server_error = str(exc)
    return status


@dataclass
class ArchiveCheck:
    """``pg-check``: a segment the server was made to close, and when it was in the store."""

    source: str
    segment: str
    store: str
    seconds: float
    system_identifier: str
    server_version: str
    base_backups_checked: int


def check_archive(
    runtime: Runtime, source: PostgresSource, timeout: float, poll: float = 0.2
) -> ArchiveCheck:
    """Force a WAL switch and wait until the store holds the closed segment; the server must
    be the cluster (and the major version) the archive's base backups were taken from."""
    from spark_backup.sources.postgres.server import server_archive_state, switch_wal

    if not source.wal_archiving:
        raise UsageError(f"source {source.name!r} does not archive WAL (wal_archiving: false)")
    server = server_of(runtime, source)
    bases = [r.manifest for r in runtime.copies(source.name, BASE)]
    store = runtime.store_for(source)
    started = time.monotonic()
    switched = switch_wal(server)
    check_same_cluster(source.name, switched.system_identifier, switched.server_version, bases)
    while not archived_wal(store, source.name, switched.segment, switched.system_identifier):
        if time.monotonic() - started > timeout:
            state = server_archive_state(server)
            failed = (
                f"; the server's archiver last failed on {state.last_failed_wal} at "
                f"{state.last_failed_time:%Y-%m-%d %H:%M:%S %Z} (see its log)"
                if state.last_failed_wal and state.last_failed_time
                else ""
            )
            raise SourceError(
                f"source {source.name!r}: WAL segment {switched.segment} did not arrive in "
                f"store {store.name!r} within {timeout:g} s{failed}"
            )
        time.sleep(poll)
    return ArchiveCheck(
        source.name,
        switched.segment,
        store.name,
        round(time.monotonic() - started, 3),
        switched.system_identifier,
        switched.server_version,
        len(bases),
    )


def check_same_cluster(
    source: str, system_identifier: str, server_version: str, bases: Sequence[Any]
) -> None:
    """``IntegrityError`` if the archive's base backups come from another cluster or another
    major version: its WAL would not replay onto them."""
    major = server_version.split(".")[0]
    for base in bases:
        meta = base.source_metadata
        if str(meta.get("system_identifier")) != system_identifier:
            raise IntegrityError(
                f"source {source!r}: the server's system identifier {system_identifier} is not "
                f"that of base backup {base.id} ({meta.get('system_identifier')}); is another "
                "cluster archiving into this source?"
            )
        if str(meta.get("server_version", "")).split(".")[0] != major:
            raise IntegrityError(
                f"source {source!r}: the server runs PostgreSQL {server_version}, base backup "
                f"{base.id} was taken from {meta.get('server_version')}; take a new base backup "
                "after a major upgrade"
            )


def wal_ranges(
    runtime: Runtime, source: PostgresSource, bases: Sequence[Any]
) -> dict[str, LogRange]:
    """Per base backup: the WAL from its start to its end position (what makes it consistent,
    as ``pgbackrest info`` shows it), and the first of those segments the archive lacks."""
    from spark_backup.sources.capability_values import LogRange

    bases = [m for m in bases if m.part == BASE_PART]
    if not bases:
        return {}
    archive = archived_wal(runtime.store_for(source), source.name)
    ranges = {}
    for base in bases:
        meta = base.source_metadata
        owner = base_system_identifier(base)
        archived = {e.name for e in archive if e.system_identifier in (None, owner)}
        size = meta.get("wal_segment_size", DEFAULT_SEGMENT_SIZE)
        first = WalSegment.from_lsn(meta["start_lsn"], meta["timeline"], size)
        # The end position is just past the last record: at a segment's start, that record
        # ended in the segment before.
        last = WalSegment(meta["timeline"], (lsn_value(meta["end_lsn"]) - 1) // size, size)
        needed = [first]
        while needed[-1].number < last.number:
            needed.append(needed[-1].next())
        missing = next((s.name for s in needed if s.name not in archived), None)
        ranges[base.id] = LogRange(
            meta["start_lsn"], meta["end_lsn"], first.name, last.name, missing
        )
    return ranges


def expire_wal(
    runtime: Runtime,
    source: PostgresSource,
    kept_bases: Sequence[Any],
    now: dt.datetime,
    dry_run: bool,
) -> list[str]:
    """WAL older than the oldest base backup that stays can serve no recovery; without a base
    backup, all WAL stays. Nothing under a lock is touched."""
    bases = [m for m in kept_bases if m.part == BASE_PART]
    if not bases:
        return []
    oldest = min(bases, key=lambda m: lsn_value(m.source_metadata["start_lsn"]))
    meta = oldest.source_metadata
    start = WalSegment.from_lsn(meta["start_lsn"], meta["timeline"], meta["wal_segment_size"])
    store = runtime.store_for(source)
    expired = []
    for entry in expendable_wal(archived_wal(store, source.name), start.name):
        if store.locked(entry.key, now):
            continue
        expired.append(entry.key)
        if not dry_run:
            store.delete(entry.key)
            if store.exists(signature_key(entry.key)):
                store.delete(signature_key(entry.key))
    return expired


def archiving_settings(runtime: Runtime, source: PostgresSource) -> dict[str, str]:
    """The server settings for continuous archiving into this plan's store (docs/runbooks/
    postgres.md explains each)."""
    runtime.store_for(source).check()  # reachable, and a local store's folder exists for wal-push
    command = shutil.which("spark-backup") or str(Path(sys.executable).with_name("spark-backup"))
    if source.wal_pusher is not None:
        from spark_backup.sources.postgres import pusher

        # Asynchronous: a shell script hands the file to the resident wal-pusher.
        archive_command = pusher.archive_command(
            pusher.spool_of(runtime, source), source.wal_pusher
        )
    else:
        archive_command = (
            f"{shlex.quote(command)} --plan {shlex.quote(str(runtime.plan_path))} "
            f"wal-push --source {source.name} %p"
        )
    return {
        "wal_level": "replica",
        "archive_mode": "on",
        # A partly filled segment is archived after at most this long: the RPO floor.
        "archive_timeout": "60s",
        "archive_command": archive_command,
        "max_wal_senders": "10",
    }


def prepare_store_for_server(runtime: Runtime, source: PostgresSource) -> tuple[str, list[str]]:
    """As root, for a server on this machine: the WAL folders of a local store made and given
    to the server's OS user, who runs archive_command. Returns (that user, folders changed);
    ("", []) when there is no such user to ask for."""
    from spark_backup.sources.postgres.server import server_settings

    if os.geteuid() != 0:
        return "", []
    try:
        settings = server_settings(server_of(runtime, source), ("data_directory",))
    except SparkBackupError:
        return "", []  # printing the settings needs no server
    os_user = _data_directory_owner(settings.get("data_directory"))
    if os_user is None:
        return "", []
    given = runtime.store_for(source).give_to(wal_prefix(source.name), os_user)
    if source.wal_pusher is not None:
        from spark_backup.sources.postgres import pusher

        # archive_command writes requests into the spool as the server's user.
        spool = pusher.spool_of(runtime, source)
        spool.mkdir(parents=True, exist_ok=True)
        entry = pwd.getpwnam(os_user)
        if (spool.stat().st_uid, spool.stat().st_gid) != (entry.pw_uid, entry.pw_gid):
            os.chown(spool, entry.pw_uid, entry.pw_gid)
            given.append(str(spool))
        pusher.prepare_spool(spool)
    return os_user, given


def apply_archiving_settings(
    runtime: Runtime, source: PostgresSource, settings: dict[str, str]
) -> list[str]:
    """ALTER SYSTEM each setting and reload; return those that need a restart."""
    from spark_backup.sources.postgres.server import apply_settings as pg_apply_settings

    return pg_apply_settings(server_of(runtime, source), settings)


# --- restore into a database --------------------------------------------------------------------


def restore_to_database(
    runtime: Runtime,
    copy: CopyRef,
    database: str,
    *,
    identity_file: str | Path | None = None,
    force: bool = False,
    no_owner: bool = False,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Restore a database dump into ``database`` on the source's server and check every
    table's row count against the dump's. The dump goes into a new staging database that
    takes the name only once the copy's checksums and the counts matched (with ``force``,
    replacing the database of that name); a failed restore drops the staging database."""
    from spark_backup.engine.pipeline import open_copy
    from spark_backup.sources.postgres import dump as pg_dump_restore

    source = runtime.source(copy.manifest.source)
    assert isinstance(source, PostgresSource)
    server = server_of(runtime, source)
    identities = runtime.identities(identity_file)
    exists = pg_dump_restore.check_target_database(server, copy.manifest, database, force)
    started = utcnow()
    staging = pg_dump_restore.staging_database_name(database)
    pg_dump_restore.create_database(server, staging, like=copy.manifest)
    try:
        with open_copy(copy.store, copy.manifest, identities, progress) as plain:
            pg_dump_restore.pg_restore_into(server, plain, staging, no_owner=no_owner)
        counts = pg_dump_restore.check_row_counts(server, copy.manifest, staging, database)
        pg_dump_restore.publish_database(server, staging, database, replace=exists)
    except BaseException:
        pg_dump_restore.drop_database(server, staging)
        raise
    return {
        "copy_id": copy.manifest.id,
        "source": source.name,
        "database": database,
        "tables": len(counts),
        "rows": sum(counts.values()),
        "seconds": round((utcnow() - started).total_seconds(), 3),
    }


# --- point-in-time recovery ---------------------------------------------------------------------


def pitr(
    runtime: Runtime,
    kind: SourceKind,
    source: PostgresSource,
    target: dt.datetime | recovery.PgTarget | None,
    target_dir: Path,
    *,
    port: int = DEFAULT_PORT,
    identity_file: str | Path | None = None,
    stop_after: bool = False,
    progress: ProgressCallback | None = None,
) -> recovery.PitrReport:
    """Recover the source to ``target`` (a time or a ``PgTarget``; None: to the end of the
    archived WAL, for a disaster) in a new cluster under ``target_dir``, start it and verify it.
    The production cluster is not touched."""
    from spark_backup.sources.capability_values import FolderRestore
    from spark_backup.sources.postgres import pitr as recovery
    from spark_backup.sources.postgres.prefetch import WalPrefetch

    goal = recovery.as_target(target)
    target_time = goal.time
    store = runtime.store_for(source)
    target_dir = Path(os.path.abspath(target_dir))
    if target_time is not None and target_time > utcnow():
        raise UsageError(
            f"--to-time {target_time.isoformat()} is in the future; use 'latest' to recover "
            "all archived WAL"
        )
    base = recovery.choose_base(
        [r.manifest for r in runtime.copies(source.name, BASE)],
        target_time,
        source.name,
        goal.lsn,
    )
    identities = runtime.identities(identity_file)
    os_user = recovery.default_os_user()
    recovery.prepare_target(target_dir, os_user)
    user = server_of(runtime, source).user or "postgres"
    report = recovery.PitrReport(
        source.name,
        user,
        base.id,
        goal.describe(),
        str(target_dir),
        port,
    )
    major = int(str(base.source_metadata["server_version"]).split(".")[0])
    bin_dir = runtime.context(source).resolve(source.bin_dir) if source.bin_dir else None
    pg_ctl = recovery.server_binary("pg_ctl", major, bin_dir)
    started = False
    began = time.monotonic()
    wanted, gap = recovery.wal_to_fetch(
        base, archived_wal(store, source.name, None, base_system_identifier(base))
    )
    if goal.immediate:
        wanted = recovery.up_to_consistency(base, wanted)
    try:
        # The WAL is fetched from here on, beside the base backup's restore and the replay.
        with (
            _wal_fetcher(store, source.name, identities, runtime.verifier) as fetch,
            WalPrefetch(
                recovery.replay_order(wanted),
                target_dir / recovery.WAL_CACHE_FOLDER,
                fetch,
                os_user,
            ) as prefetch,
        ):
            recovery.timed(
                report,
                "restore_base_backup",
                lambda: kind.restore_to_folder(
                    CopyRef(store, base),
                    identities,
                    target_dir / recovery.DATA_FOLDER,
                    FolderRestore(progress=progress),
                ),
            )
            recovery.configure_recovery(target_dir, goal, port, os_user)
            started = True
            try:
                recovery.timed(
                    report,
                    "recovery",
                    lambda: recovery.start_and_wait(
                        pg_ctl, target_dir, port, os_user, recovery.START_TIMEOUT_SECONDS, user
                    ),
                )
            except SourceError as exc:
                if (refused := prefetch.refused()) is not None:
                    # The server stopped because a file could not be fetched: say which.
                    raise _prefetch_error(refused) from None
                if not isinstance(exc, recovery.RecoveryEndedEarly):
                    raise
                points = recovery.recovery_points(target_dir / recovery.LOG_FILE)
                reached = points["last_transaction"] or points["redo_done_lsn"] or "unknown"
                missing = f"segment {gap} is missing" if gap else "it ends"
                raise IntegrityError(
                    f"recovery of {source.name!r} cannot reach {report.target_time}: the "
                    f"WAL archive has no more WAL ({missing}); the last reachable point is "
                    f"{reached}. Choose a target at or before it. ({exc})"
                ) from None
            finally:
                report.wal_files = prefetch.fetched
                report.seconds["fetch_wal_busy"] = round(prefetch.seconds_fetching, 3)
                report.seconds["recovery_waited_for_wal"] = round(prefetch.seconds_waited, 3)
        points = recovery.recovery_points(target_dir / recovery.LOG_FILE)
        report.stopped = points["stopped"]
        report.last_transaction = points["last_transaction"]
        report.recovered_to = points["last_transaction"]
        if goal.is_latest:
            # "latest" must mean all of the archive: a gap, or WAL that was fetched but not
            # replayed, is an early stop nobody chose.
            recovery.check_replayed_all(
                points, wanted, gap, source.name, base.source_metadata["wal_segment_size"]
            )
        report.databases = recovery.timed(
            report, "verify", lambda: recovery.verify_cluster(target_dir, port, base, user)
        )
        report.ok = True
    except SparkBackupError as exc:
        report.error = str(exc)
        raise
    finally:
        if started and (stop_after or not report.ok):
            recovery.stop(pg_ctl, target_dir, os_user)
        recovery.remove_wal_cache(target_dir)
        report.wall_seconds = round(time.monotonic() - began, 3)
        recovery.write_report(target_dir, report)
    return report


@contextmanager
def _wal_fetcher(
    store: ObjectStore, source: str, identities: list[x25519.Identity], verifier: Verifier
) -> Iterator[Callable[[ArchivedWal, Path], None]]:
    """``fetch_wal`` for the prefetch threads: each thread decrypts in a worker process of its
    own, started once and reused for every file (a start costs about 80 ms)."""
    from spark_backup.engine.age_worker import AgeWorker

    local = threading.local()
    workers: list[AgeWorker] = []
    guard = threading.Lock()

    def fetch(entry: ArchivedWal, destination: Path) -> None:
        worker = getattr(local, "worker", None)
        if worker is None:
            worker = local.worker = AgeWorker(identities)
            with guard:
                workers.append(worker)
        fetch_wal(
            store, source, entry.name, destination, identities, entry, verifier, worker=worker
        )

    try:
        yield fetch
    finally:
        for worker in workers:
            worker.close()


def _prefetch_error(failure: Exception) -> Exception:
    """A failed fetch as pg-pitr reports it: our own errors as they are, anything else typed
    as a failed source read."""
    if isinstance(failure, SparkBackupError):
        return failure
    return SourceError(f"fetching WAL for recovery failed: {failure}")
