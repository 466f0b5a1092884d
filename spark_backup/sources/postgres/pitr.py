"""Point-in-time recovery into a new, throwaway cluster; the production cluster is never touched.

Layout of the target folder (which must be new or empty)::

    DIR/data/            the recovered cluster (from the newest base backup before the target)
    DIR/wal_archive/     the archived WAL it replays, fetched and checked ahead of replay
    DIR/pg_hba.conf      local socket connections only, in DIR (nothing listens on TCP)
    DIR/postgresql.log   the server log
    DIR/pitr.json        what was recovered, to which point, and the verification

The WAL is fetched ahead of replay, in parallel and while the base backup is still being
restored (decrypted and checked by spark-backup, ``prefetch.py``), so the server's
``restore_command`` is a small shell script that copies a file once it is there: the recovery
cluster needs neither spark-backup nor a private key. Recovery by hand uses ``wal-fetch`` or a
plain ``cp`` (docs/runbooks/postgres.md).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from contextlib import closing, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spark_backup.engine.manifest import Manifest
from spark_backup.engine.processes import first_error, tool_environment
from spark_backup.errors import IntegrityError, RestoreRefused, SourceError, UsageError
from spark_backup.sources.postgres.pitr_options import LATEST
from spark_backup.sources.postgres.prefetch import SCRIPT_FILE
from spark_backup.sources.postgres.server import (
    DEBIAN_BIN_DIRS,
    conf_value,
    first_line,
    table_row_counts,
)
from spark_backup.sources.postgres.wal import ArchivedWal, newest_version
from spark_backup.sources.postgres.walname import DEFAULT_SEGMENT_SIZE, WalSegment, lsn_value

if TYPE_CHECKING:
    import psycopg

DATA_FOLDER = "data"
WAL_CACHE_FOLDER = "wal_archive"
LOG_FILE = "postgresql.log"
REPORT_FILE = "pitr.json"
HBA_FILE = "pg_hba.conf"
# PostgreSQL 15's words when the WAL ran out before the recovery target.
ENDED_EARLY = "recovery ended before configured recovery target was reached"
# postmaster.pid's eighth line is the server's status (PostgreSQL's LOCK_FILE_LINE_PM_STATUS).
POSTMASTER_PID_STATUS_LINE = 7
PM_STATUS_READY = "ready"
START_TIMEOUT_SECONDS = 2 * 3600  # the RTO: a recovery that takes longer has failed anyway
# Our own polling connections are refused with a FATAL line while the server recovers or shuts
# down; those may be logged after the startup process's real reason, so they never name the cause.
_CONNECTION_REFUSED_RE = re.compile(
    r"FATAL:\s+the database system is (starting up|in recovery mode|shutting down|"
    r"not (yet )?accepting connections)"
)
_STOPPING_RE = re.compile(r"recovery stopping (before|after) .*?time ([0-9-]+ [0-9:.]+\+?[0-9:]*)")
_LAST_TX_RE = re.compile(r"last completed transaction was at log time ([0-9-]+ [0-9:.]+\+?[0-9:]*)")
_REDO_DONE_RE = re.compile(r"redo done at ([0-9A-F]+/[0-9A-F]+)")


class RecoveryEndedEarly(SourceError):
    """The server used up the WAL it was given before reaching the recovery target: with more
    WAL, recovery can resume where it stopped."""


def _start_failure(log: Path, since: int, pg_ctl_output: str = "") -> SourceError:
    """Why this start failed, as the server logged it, typed by what the server said."""
    reason = _log_failure(log, since, pg_ctl_output)
    return RecoveryEndedEarly(reason) if ENDED_EARLY in reason else SourceError(reason)


@dataclass
class PitrReport:
    source: str
    user: str
    base_copy_id: str
    target_time: str
    target_dir: str
    port: int
    ok: bool = False
    recovered_to: str | None = None
    stopped: str | None = None
    last_transaction: str | None = None
    wal_files: int = 0
    # Per step; fetch_wal_busy (thread-seconds) overlaps the others, recovery_waited_for_wal
    # is part of recovery: their sum is not the wall time.
    seconds: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    databases: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None

    def connect_hint(self) -> str:
        return f"psql -h {self.target_dir} -p {self.port} -U {self.user}"

    def breakdown(self) -> str:
        """Where the wall time went, for a person."""
        step = self.seconds.get
        return (
            f"base backup {step('restore_base_backup', 0):.1f}s, replay "
            f"{step('recovery', 0):.1f}s (waiting for WAL {step('recovery_waited_for_wal', 0):.1f}s),"
            f" checks {step('verify', 0):.1f}s; WAL fetched alongside in "
            f"{step('fetch_wal_busy', 0):.1f} thread-seconds"
        )


_LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")
# PostgreSQL's NAMEDATALEN - 1: a longer restore point name is cut, and would never match.
MAX_RESTORE_POINT_NAME = 63


@dataclass(frozen=True)
class PgTarget:
    """Where recovery stops: a time, a transaction id, a WAL position, a named restore point
    (``pg_create_restore_point``), ``immediate`` (as soon as the base backup is consistent), or
    none of them: the end of the archived WAL. ``inclusive``: stop after the target (PostgreSQL's
    default) rather than just before it; time, xid and lsn only."""

    time: dt.datetime | None = None
    xid: int | None = None
    lsn: str | None = None
    name: str | None = None
    immediate: bool = False
    inclusive: bool = True

    def __post_init__(self) -> None:
        chosen = [self.time, self.xid, self.lsn, self.name, self.immediate or None]
        if sum(value is not None for value in chosen) > 1:
            raise UsageError(
                "choose one recovery target: --to-time, --to-xid, --to-lsn, --to-name or "
                "--immediate"
            )
        if self.xid is not None and self.xid < 3:
            raise UsageError(f"--to-xid {self.xid}: a transaction id is 3 or more")
        if self.lsn is not None and not _LSN_RE.match(self.lsn):
            raise UsageError(f"--to-lsn {self.lsn!r} is not a WAL position such as 0/3000060")
        if self.name is not None and not 0 < len(self.name.encode()) <= MAX_RESTORE_POINT_NAME:
            raise UsageError(
                f"--to-name: a restore point name has 1 to {MAX_RESTORE_POINT_NAME} bytes"
            )
        if not self.inclusive and (self.name is not None or self.immediate or self.is_latest):
            raise UsageError("--exclusive applies to --to-time, --to-xid and --to-lsn only")

    @property
    def is_latest(self) -> bool:
        return (
            self.time is None
            and self.xid is None
            and self.lsn is None
            and self.name is None
            and not self.immediate
        )

    def describe(self) -> str:
        if self.time is not None:
            what = self.time.isoformat()
        elif self.xid is not None:
            what = f"xid {self.xid}"
        elif self.lsn is not None:
            what = f"lsn {self.lsn.upper()}"
        elif self.name is not None:
            what = f"restore point {self.name!r}"
        else:
            what = "immediate" if self.immediate else LATEST
        return what if self.inclusive else f"{what} (exclusive)"

    def settings(self) -> dict[str, str]:
        """The recovery_target* settings (the others are cleared by configure_recovery)."""
        if self.is_latest:
            return {}  # replay all archived WAL, then promote
        if self.time is not None:
            found = {"recovery_target_time": conf_value(self.time.isoformat(sep=" "))}
        elif self.xid is not None:
            found = {"recovery_target_xid": conf_value(str(self.xid))}
        elif self.lsn is not None:
            found = {"recovery_target_lsn": conf_value(self.lsn.upper())}
        elif self.name is not None:
            found = {"recovery_target_name": conf_value(self.name)}
        else:
            found = {"recovery_target": "'immediate'"}
        found["recovery_target_inclusive"] = "on" if self.inclusive else "off"
        found["recovery_target_action"] = "'promote'"
        return found


def choose_base(
    bases: Sequence[Manifest], target: dt.datetime | None, source: str, lsn: str | None = None
) -> Manifest:
    """The newest base backup that finished (was consistent) at or before ``target``, or whose
    end is at or before WAL position ``lsn`` (neither: the newest of all)."""
    usable = [
        b
        for b in bases
        if (target is None or b.finished <= target)
        and (lsn is None or lsn_value(b.source_metadata["end_lsn"]) <= lsn_value(lsn))
    ]
    if usable:
        return max(usable, key=lambda b: (b.finished_at, b.id))
    if not bases:
        raise UsageError(f"source {source!r} has no base backup; recovery needs one")
    oldest = min(bases, key=lambda b: b.finished_at)
    if lsn is not None:
        raise UsageError(
            f"--to-lsn {lsn} is before the end of the oldest base backup of {source!r} "
            f"({oldest.id}, consistent from {oldest.source_metadata['end_lsn']}); choose a "
            "later position"
        )
    raise UsageError(
        f"--to-time {target.isoformat() if target else LATEST} is before the oldest base backup of {source!r} "
        f"({oldest.id}, consistent from {oldest.finished_at}); choose a later time"
    )


def up_to_consistency(base: Manifest, wanted: list[ArchivedWal]) -> list[ArchivedWal]:
    """Of ``wanted``, what recovery to ``immediate`` reads: the segments up to the one where
    the base backup became consistent, and the history files."""
    meta = base.source_metadata
    size = meta.get("wal_segment_size", DEFAULT_SEGMENT_SIZE)
    end = WalSegment.from_lsn(meta["end_lsn"], meta["timeline"], size).number
    return [
        entry
        for entry in wanted
        if not entry.is_segment or WalSegment.from_name(entry.name, size).number <= end
    ]


def prepare_target(target_dir: Path, os_user: str | None) -> None:
    """An empty folder the cluster's OS user can reach (every parent open to it)."""
    if target_dir.exists():
        if not target_dir.is_dir():
            raise RestoreRefused(f"--target-dir {target_dir} exists and is not a directory")
        if any(target_dir.iterdir()):
            raise RestoreRefused(
                f"--target-dir {target_dir} is not empty; recovery builds a new cluster in an "
                "empty folder"
            )
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RestoreRefused(f"cannot create --target-dir {target_dir}: {exc.strerror}") from None
    hand_over(target_dir, os_user)
    if os_user and subprocess.run(as_user(["test", "-x", str(target_dir)], os_user)).returncode:
        raise RestoreRefused(
            f"--target-dir {target_dir}: the {os_user} OS user, which runs the recovered "
            "cluster, cannot enter it (a parent folder is closed to it); choose another folder"
        )


def wal_to_fetch(
    base: Manifest, archive: list[ArchivedWal]
) -> tuple[list[ArchivedWal], str | None]:
    """The archived WAL recovery from ``base`` can use: timeline history files and every segment
    from the base's start onward, up to the first gap, then the newest streamed partial segment
    (``wal-receive``) of the segment after the last one, if any; and the first missing segment,
    if any (a partial segment at the end is no gap: the WAL ends in it)."""
    meta = base.source_metadata
    size = meta.get("wal_segment_size", DEFAULT_SEGMENT_SIZE)
    start = WalSegment.from_lsn(meta["start_lsn"], meta["timeline"], size)
    histories = [entry for entry in archive if entry.name.endswith(".history")]
    segments = [
        entry
        for entry in archive
        if entry.is_segment
        and entry.timeline >= meta["timeline"]
        and WalSegment.from_name(entry.name, size).number >= start.number
    ]
    numbers = sorted({WalSegment.from_name(entry.name, size).number for entry in segments})
    usable, gap = set(), None
    expected = start
    for number in numbers:
        if number != expected.number:
            gap = expected.name
            break
        usable.add(number)
        expected = expected.next()
    wanted = histories + [
        e for e in segments if WalSegment.from_name(e.name, size).number in usable
    ]
    partials = [
        entry
        for entry in archive
        if entry.is_partial
        and entry.timeline >= meta["timeline"]
        and WalSegment.from_name(entry.name, size).number == expected.number
    ]
    if gap is None and partials:
        wanted.append(newest_version(partials))
    return wanted, gap


def server_binary(name: str, major: int, bin_dir: Path | None) -> Path:
    """A server binary of exactly the base backup's major version: a data directory runs only
    under its own major release."""
    folder = bin_dir or Path(DEBIAN_BIN_DIRS.format(major=major))
    path = folder / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise SourceError(
            f"{path} not found: recovery needs the PostgreSQL {major} server binaries "
            "(set bin_dir in the plan)"
        )
    return path


def configure_recovery(
    target_dir: Path, target: dt.datetime | PgTarget | None, port: int, os_user: str | None
) -> None:
    """Recovery settings appended to the restored cluster's own (later lines win). Whatever of
    production's settings would reach outside is switched off: archiving, TCP, replication
    connections, subscriptions, and production's own recovery commands and targets."""
    data = target_dir / DATA_FOLDER
    (target_dir / HBA_FILE).write_text(
        "# spark-backup pg-pitr: local socket only, in the recovery folder\nlocal all all trust\n",
        encoding="utf-8",
    )
    (data / "postgresql.conf").touch(exist_ok=True)  # Debian keeps it outside the data folder
    script = shlex.quote(str(target_dir / WAL_CACHE_FOLDER / SCRIPT_FILE))
    settings = {
        "port": str(port),
        "listen_addresses": "''",
        "unix_socket_directories": conf_value(str(target_dir)),
        "hba_file": conf_value(str(target_dir / HBA_FILE)),
        "archive_mode": "off",
        # Only a file that is not in the archive may end recovery (exit 1); a fetch or copy
        # that fails for any other reason aborts it (above 125), never passes for the end of
        # the WAL (prefetch.restore_script).
        "restore_command": conf_value(f'{script} "%f" "%p"'),
        "recovery_end_command": "''",
        "archive_cleanup_command": "''",
        "primary_conninfo": "''",
        "primary_slot_name": "''",
        "max_logical_replication_workers": "0",  # no subscription may consume a publisher's slot
        # No connections before promotion: also lifts hot standby's rule that these limits
        # be at least the primary's, whose settings may live outside the data folder.
        "hot_standby": "off",
        "recovery_target": "''",
        "recovery_target_lsn": "''",
        "recovery_target_name": "''",
        "recovery_target_xid": "''",
        "recovery_target_time": "''",
        "recovery_target_timeline": "'latest'",
    }
    # Without a target, recovery replays all archived WAL and then promotes. The target comes
    # after the cleared ones: PostgreSQL refuses any recovery_target* line, even an empty one,
    # that follows a target already set ("multiple recovery targets specified").
    chosen = as_target(target).settings()
    settings = {name: value for name, value in settings.items() if name not in chosen} | chosen
    with open(data / "postgresql.auto.conf", "a", encoding="utf-8") as conf:
        conf.write("\n# spark-backup pg-pitr: recovery into a throwaway cluster\n")
        conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
    (data / "recovery.signal").touch()
    (data / "standby.signal").unlink(missing_ok=True)
    os.chmod(data, 0o700)
    os.chmod(target_dir, 0o700)  # the socket trusts whoever reaches it: only the owner may
    hand_over(target_dir, os_user)


def as_target(target: dt.datetime | PgTarget | None) -> PgTarget:
    """A time (or None, the latest point) as a target."""
    return target if isinstance(target, PgTarget) else PgTarget(time=target)


def hand_over(folder: Path, os_user: str | None) -> None:
    """Give a folder and all in it to the cluster's OS user (when we run as root)."""
    if not os_user:
        return
    entry = pwd.getpwnam(os_user)
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            # The WAL prefetch renames and deletes files in DIR/wal_archive meanwhile.
            with suppress(FileNotFoundError):
                os.lchown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)
    os.lchown(folder, entry.pw_uid, entry.pw_gid)


def as_user(args: Sequence[str], os_user: str | None) -> list[str]:
    return ["runuser", "-u", os_user, "--", *args] if os_user else list(args)


def start_and_wait(
    pg_ctl: Path, target_dir: Path, port: int, os_user: str | None, timeout: float, user: str
) -> None:
    """Start the cluster and wait until recovery has ended and it was promoted. Raises with the
    server's own reason (from its log) if it stops instead."""
    data, log = target_dir / DATA_FOLDER, target_dir / LOG_FILE
    since = log.stat().st_size if log.exists() else 0  # the log is appended across starts
    # -w: returns once recovery has ended and the server accepts connections, or fails if it
    # stopped.
    result = subprocess.run(
        as_user(
            [str(pg_ctl), "-D", str(data), "-l", str(log), "-w", "-t", str(int(timeout)), "start"],
            os_user,
        ),
        capture_output=True,
        text=True,
        env=tool_environment(),
    )
    if result.returncode != 0:
        raise _start_failure(log, since, result.stderr)
    # pg_ctl returns as soon as recovery starts. The postmaster announces promotion in its lock
    # file, as pg_ctl itself reads it; polling that, not connections, keeps the log to the
    # server's own lines.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _postmaster_status(data) == PM_STATUS_READY:
            with closing(_connect(target_dir, port, user)) as conn, conn.cursor() as cursor:
                cursor.execute("SELECT pg_is_in_recovery()")
                if not cursor.fetchone()[0]:
                    return
        elif _server_stopped(pg_ctl, data, os_user):
            raise _start_failure(log, since)
        time.sleep(0.5)
    raise SourceError(f"recovery did not finish within {timeout:.0f} s (see {log})")


def _postmaster_status(data: Path) -> str | None:
    """The status line of postmaster.pid ("starting", "standby", "ready", "stopping")."""
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    return (
        lines[POSTMASTER_PID_STATUS_LINE].strip()
        if len(lines) > POSTMASTER_PID_STATUS_LINE
        else None
    )


def _server_stopped(pg_ctl: Path, data: Path, os_user: str | None) -> bool:
    status = subprocess.run(
        as_user([str(pg_ctl), "-D", str(data), "status"], os_user),
        capture_output=True,
        env=tool_environment(),
    )
    return status.returncode == 3  # pg_ctl: no server running


def stop(pg_ctl: Path, target_dir: Path, os_user: str | None) -> None:
    subprocess.run(
        as_user([str(pg_ctl), "-D", str(target_dir / DATA_FOLDER), "-m", "fast", "stop"], os_user),
        capture_output=True,
        env=tool_environment(),
    )


def _connect(
    target_dir: Path, port: int, user: str, dbname: str = "postgres"
) -> psycopg.Connection:
    import psycopg  # loads with a connection, not with the kind (server.py says why)

    return psycopg.connect(
        host=str(target_dir), port=port, user=user, dbname=dbname, connect_timeout=5
    )


def _log_failure(log: Path, since: int, pg_ctl_output: str = "") -> str:
    """The server's last FATAL or PANIC line of this start, else what pg_ctl said."""
    text = ""
    if log.exists():
        with open(log, "rb") as handle:
            handle.seek(since)
            text = handle.read().decode("utf-8", errors="replace")
    fatal = [
        line
        for line in text.splitlines()
        if ("FATAL" in line or "PANIC" in line) and not _CONNECTION_REFUSED_RE.search(line)
    ]
    if fatal:
        reason = fatal[-1].split("FATAL:", 1)[-1].split("PANIC:", 1)[-1].strip()
    else:
        reason = first_error(pg_ctl_output.splitlines(), 1) if pg_ctl_output else "it stopped"
    return f"the recovery cluster failed: {reason} (log: {log})"


def recovery_points(log: Path) -> dict[str, str | None]:
    """Where recovery stopped, from the server log."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    stopping = _STOPPING_RE.findall(text)
    last_tx = _LAST_TX_RE.findall(text)
    redo = _REDO_DONE_RE.findall(text)
    return {
        "stopped": f"{stopping[-1][0]} a transaction at {stopping[-1][1]}" if stopping else None,
        "last_transaction": last_tx[-1] if last_tx else None,
        "redo_done_lsn": redo[-1] if redo else None,
    }


def verify_cluster(
    target_dir: Path, port: int, base: Manifest, user: str
) -> dict[str, dict[str, Any]]:
    """Every database the base backup recorded must accept connections and every table must be
    readable; the counts are reported beside those recorded when the base backup started."""
    import psycopg

    recorded: dict[str, dict[str, int]] = base.source_metadata.get("row_counts", {})
    result: dict[str, dict[str, Any]] = {}
    for database in base.source_metadata.get("databases", []):
        try:
            with closing(_connect(target_dir, port, user, database)) as conn:
                counts = table_row_counts(conn, logged_only=True)
        except psycopg.Error as exc:
            raise IntegrityError(
                f"recovered cluster: database {database!r} cannot be read: {first_line(str(exc))}"
            ) from None
        at_backup = recorded.get(database, {})
        result[database] = {
            "row_counts": counts,
            "row_counts_at_base_backup": at_backup,
            "tables_gone_since_base_backup": sorted(set(at_backup) - set(counts)),
        }
    return result


def write_report(target_dir: Path, report: PitrReport) -> None:
    (target_dir / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")


def timed(report: PitrReport, step: str, action: Callable[[], Any]) -> Any:
    """Run ``action``, adding its duration to the report's ``step``."""
    started = time.monotonic()
    try:
        return action()
    finally:
        spent = report.seconds.get(step, 0.0) + time.monotonic() - started
        report.seconds[step] = round(spent, 3)


def replay_order(wanted: list[ArchivedWal]) -> list[ArchivedWal]:
    """The WAL in the order recovery reads it: the history files, then the segments by position
    (and timeline), then a streamed partial segment, where the WAL ends."""
    histories = [entry for entry in wanted if not entry.is_segment and not entry.is_partial]
    segments = sorted((e for e in wanted if e.is_segment), key=lambda e: (e.position, e.timeline))
    return histories + segments + [entry for entry in wanted if entry.is_partial]


def default_os_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, run the cluster as ``postgres``."""
    return "postgres" if os.geteuid() == 0 else None


def remove_wal_cache(target_dir: Path) -> None:
    shutil.rmtree(target_dir / WAL_CACHE_FOLDER, ignore_errors=True)


def check_replayed_all(
    points: dict[str, str | None],
    fetched: list[ArchivedWal],
    gap: str | None,
    source: str,
    segment_size: int,
) -> None:
    """After a recovery to the end of the archive: it must have replayed into the last segment
    fetched, and the archive must have had no gap."""
    segments = [entry for entry in fetched if entry.is_segment]
    reached = points["last_transaction"] or points["redo_done_lsn"] or "unknown"
    if gap:
        raise IntegrityError(
            f"recovery of {source!r} to the latest point stopped at a gap in the WAL archive: "
            f"segment {gap} is missing; the last reachable point is {reached}. Re-run with "
            "--to-time at or before it to accept that point"
        )
    redo = points["redo_done_lsn"]
    if segments and redo:
        last = max(segments, key=lambda entry: (entry.position, entry.timeline))
        if lsn_value(redo) < WalSegment.from_name(last.name, segment_size).start:
            raise IntegrityError(
                f"recovery of {source!r} stopped at {redo}, before the last archived segment "
                f"{last.name}: the server could not read all fetched WAL (see its log)"
            )
