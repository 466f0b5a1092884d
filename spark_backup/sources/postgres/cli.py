"""PostgreSQL's own commands: WAL archiving for the server (``wal-push``, ``wal-fetch``), the
archive's lag, archiving settings, and point-in-time recovery."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from spark_backup.console import error_line, parse_time, printable, stderr, stdout
from spark_backup.errors import IntegrityError, StoreError, UsageError
from spark_backup.sources.holder import current_runtime
from spark_backup.sources.postgres.pitr_options import DEFAULT_PORT, LATEST

# ``--help`` imports this module; the kind, its operations and psycopg load when a command runs.
if TYPE_CHECKING:
    from spark_backup.sources.postgres import ops

# restore_command: PostgreSQL ends recovery on exit status 1 to 125 (the file is not there) and
# aborts it on a status above 125, as if the command had been killed: a store that cannot be
# reached, or a damaged file, must not pass for the end of the WAL.
WAL_FETCH_MISSING = 1
WAL_FETCH_ABORT = 255


def _source(name: str | None) -> Any:
    from spark_backup.sources.postgres import KIND, ops

    runtime = current_runtime()
    return runtime, ops.postgres_source(runtime, KIND, name)


def _ops() -> Any:
    from spark_backup.sources.postgres import ops

    return ops


@click.command("wal-push")
@click.argument("path", required=False)
@click.option("--source", help="The PostgreSQL source (default: the plan's only one).")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Archive nothing: check that this user can read the plan and the recipients and "
    "write into the WAL archive (plan check --probe runs it as the server's user).",
)
@click.option(
    "--parallel",
    default=1,
    show_default=True,
    type=click.IntRange(1, 32),
    help="Also push up to N-1 further segments the server has marked ready, at once; the "
    "server's call for each of them then returns as soon as the store is seen to hold it.",
)
def wal_push(path: str | None, source: str | None, dry_run: bool, parallel: int) -> None:
    """Archive one WAL file: archive_command = 'spark-backup --plan PLAN wal-push %p'.
    Pushing a file already archived with the same content succeeds; other content fails."""
    from spark_backup.sources.postgres.wal import WalDigest

    # The file is hashed while the plan is read.
    digest = WalDigest(Path(path)) if path is not None and not dry_run else None
    runtime, chosen = _source(source)
    if dry_run:
        where = _ops().wal_push_dry_run(runtime, chosen)
        stdout.print(f"wal-push would archive into {where}", highlight=False, soft_wrap=True)
        return
    if path is None:
        raise UsageError("wal-push needs the WAL file's PATH (%p), or --dry-run")
    outcome = _ops().wal_push(runtime, chosen, Path(path), parallel, digest)
    if outcome not in ("archived", "archived ahead"):
        stderr.print(f"{printable(Path(path).name)}: {outcome}", highlight=False)


class _RestoreCommand(click.Command):
    """A command PostgreSQL runs as restore_command: a mistake in its arguments must abort
    recovery (exit 255) like any other failure, not pass for a missing file."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.ClickException as exc:
            exc.exit_code = WAL_FETCH_ABORT
            raise


@click.command("wal-fetch", cls=_RestoreCommand)
@click.argument("name")
@click.argument("destination")
@click.option("--source", help="The PostgreSQL source (default: the plan's only one).")
@click.option("--identity", type=click.Path(dir_okay=False), help="age identity file.")
@click.option(
    "--standby",
    is_flag=True,
    help="For a standby's restore_command: retry an unreachable store quietly, then exit 1 "
    "(PostgreSQL asks again later) rather than 255 (which stops the standby).",
)
@click.option(
    "--retry-seconds",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="With --standby: how long to retry an unreachable store.",
)
def wal_fetch(
    name: str,
    destination: str,
    source: str | None,
    identity: str | None,
    standby: bool,
    retry_seconds: float,
) -> None:
    """Restore one WAL file: restore_command = 'spark-backup --plan PLAN wal-fetch %f %p'.
    Exit 0 restored, 1 not in the archive (recovery ends there), 255 anything else (recovery
    aborts rather than stopping early). With --standby, an unreachable store is retried and
    then also exits 1: a standby waits for the file, it never ends recovery."""
    from spark_backup.sources.postgres.wal import WalNotArchived

    try:
        runtime, chosen = _source(source)
        _ops().wal_fetch(
            runtime, chosen, name, Path(destination), identity, retry_seconds if standby else 0
        )
    except WalNotArchived as error:
        stderr.print(printable(error), highlight=False, soft_wrap=True)
        sys.exit(WAL_FETCH_MISSING)
    except StoreError as error:
        error_line(error)
        sys.exit(WAL_FETCH_MISSING if standby else WAL_FETCH_ABORT)
    except Exception as error:
        error_line(error)
        sys.exit(WAL_FETCH_ABORT)


@click.command("wal-status")
@click.argument("source", required=False)
@click.option("--json", "as_json", is_flag=True, help="Status as JSON.")
def wal_status(source: str | None, as_json: bool) -> None:
    """How far the WAL archive lags behind the server, against the RPO. Exit 3 if beyond it."""
    from spark_backup.engine.settings import format_duration

    runtime, chosen = _source(source)
    status = _ops().wal_archive_status(runtime, chosen)
    row = wal_status_row(status)
    if as_json:
        click.echo(json.dumps(row, indent=2))
    else:
        lag = "none archived" if status.lag is None else f"{row['lag_seconds']:.0f} s"
        stdout.print(
            f"{'ok' if status.ok else 'BEHIND'}  {status.source}: archive lag {lag} "
            f"(RPO {format_duration(status.rpo)}), newest {row['newest_segment']}"
            + (f"; server: {printable(status.server_error)}" if status.server_error else "")
            + (f"; {status.receiver_problem}" if status.receiver_problem else ""),
            highlight=False,
        )
    if not status.ok:
        sys.exit(IntegrityError.exit_code)


def wal_status_row(status: ops.WalArchiveStatus) -> dict[str, Any]:
    server = status.server
    return {
        "source": status.source,
        "ok": status.ok,
        "lag_seconds": None if status.lag is None else status.lag.total_seconds(),
        "rpo_seconds": status.rpo.total_seconds(),
        "newest_segment": status.newest.name if status.newest else None,
        "newest_archived_at": status.newest.modified.isoformat() if status.newest else None,
        "server_segment": server.current_segment if server else None,
        "failed_count": server.failed_count if server else None,
        "last_failed_wal": server.last_failed_wal if server else None,
        "server_error": status.server_error,
        "receiver_problem": status.receiver_problem,
    }


@click.command("pg-setup-archiving")
@click.argument("source", required=False)
@click.option("--apply", is_flag=True, help="ALTER SYSTEM on the server (needs a superuser).")
def pg_setup_archiving(source: str | None, apply: bool) -> None:
    """Print (or apply) the server settings for continuous archiving into the plan's store."""
    from spark_backup.sources.postgres.server import conf_value

    runtime, chosen = _source(source)
    settings = _ops().archiving_settings(runtime, chosen)
    os_user, given = _ops().prepare_store_for_server(runtime, chosen)
    for folder in given:
        stdout.print(
            f"# {folder} now belongs to {os_user}, who runs archive_command",
            highlight=False,
            soft_wrap=True,
        )
    if not apply:
        for name, value in settings.items():
            stdout.print(f"{name} = {conf_value(value)}", highlight=False, soft_wrap=True)
        stdout.print(
            "# put these in postgresql.conf (or run with --apply), then restart PostgreSQL",
            highlight=False,
        )
        return
    restart = _ops().apply_archiving_settings(runtime, chosen, settings)
    stdout.print(
        "applied with ALTER SYSTEM; "
        + (f"restart PostgreSQL for {', '.join(restart)}" if restart else "reloaded"),
        highlight=False,
    )


@click.command("pg-check")
@click.argument("source", required=False)
@click.option(
    "--timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds to wait for the segment in the store.",
)
@click.option("--json", "as_json", is_flag=True, help="Report as JSON.")
def pg_check(source: str | None, timeout: float, as_json: bool) -> None:
    """Send a WAL file through the archive: switch the server's WAL (needs a superuser) and
    wait until the closed segment is in the store. Also checks that the server is the cluster
    and major version the archive's base backups come from."""
    runtime, chosen = _source(source)
    check = _ops().check_archive(runtime, chosen, timeout)
    if as_json:
        click.echo(json.dumps(asdict(check), indent=2))
        return
    stdout.print(
        f"WAL segment {check.segment} of {check.source} arrived in store {check.store!r} after "
        f"{check.seconds:.1f}s (system identifier {check.system_identifier}, PostgreSQL "
        f"{check.server_version}, {check.base_backups_checked} base backups of this cluster)",
        highlight=False,
    )


@click.command("pg-pitr")
@click.argument("source", required=False)
@click.option(
    "--to-time",
    "to_time",
    help="ISO 8601 time (without a zone it is UTC), or 'latest': all archived WAL.",
)
@click.option("--to-xid", "to_xid", type=int, help="A transaction id (txid_current()).")
@click.option("--to-lsn", "to_lsn", help="A WAL position such as 0/3000060.")
@click.option("--to-name", "to_name", help="A restore point (pg_create_restore_point).")
@click.option("--immediate", is_flag=True, help="Stop as soon as the base backup is consistent.")
@click.option(
    "--exclusive",
    is_flag=True,
    help="Stop just before the time, xid or lsn rather than after it.",
)
@click.option("--target-dir", required=True, help="A new or empty folder for the cluster.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option("--identity", type=click.Path(dir_okay=False), help="age identity file.")
@click.option("--stop", "stop_after", is_flag=True, help="Stop the cluster after verifying it.")
@click.option("--json", "as_json", is_flag=True, help="Report as JSON.")
def pg_pitr(
    source: str | None,
    to_time: str | None,
    to_xid: int | None,
    to_lsn: str | None,
    to_name: str | None,
    immediate: bool,
    exclusive: bool,
    target_dir: str,
    port: int,
    identity: str | None,
    stop_after: bool,
    as_json: bool,
) -> None:
    """Recover SOURCE to a point in time in a new cluster (base backup plus archived WAL),
    start it on a local socket in TARGET_DIR and verify it. Production is not touched. The
    target is one of --to-time (or 'latest'), --to-xid, --to-lsn, --to-name, --immediate."""
    if to_time is None and to_xid is None and to_lsn is None and to_name is None:
        if not immediate:
            raise UsageError(
                "choose a recovery target: --to-time TIME|latest, --to-xid, --to-lsn, "
                "--to-name or --immediate"
            )
    elif to_time == LATEST and (to_xid, to_lsn, to_name, immediate) != (None, None, None, False):
        raise UsageError("--to-time latest is a recovery target of its own; choose one")
    from spark_backup.sources.postgres import KIND
    from spark_backup.sources.postgres.pitr import PgTarget

    target = PgTarget(
        time=None if to_time in (None, LATEST) else parse_time(to_time),
        xid=to_xid,
        lsn=to_lsn,
        name=to_name,
        immediate=immediate,
        inclusive=not exclusive,
    )
    runtime, chosen = _source(source)
    report = _ops().pitr(
        runtime,
        KIND,
        chosen,
        target,
        Path(target_dir),
        port=port,
        identity_file=identity,
        stop_after=stop_after,
    )
    if as_json:
        click.echo(json.dumps(asdict(report), indent=2))
        return
    tables = sum(len(d["row_counts"]) for d in report.databases.values())
    stdout.print(
        f"recovered {report.source} to {report.target_time} (last transaction replayed: "
        f"{report.recovered_to or 'none after the base backup'}) from "
        f"{report.base_copy_id} with {report.wal_files} WAL files in "
        f"{report.wall_seconds:.1f}s; {len(report.databases)} databases, {tables} "
        f"tables readable ({report.breakdown()})",
        highlight=False,
    )
    if not stop_after:
        stdout.print(f"running: {report.connect_hint()}", highlight=False)


@click.command("wal-receive")
@click.argument("source", required=False)
@click.option(
    "--spool",
    type=click.Path(file_okay=False),
    help="A folder on a lasting disk where pg_receivewal writes before the store has the WAL "
    "(default: the plan's wal_receive.spool).",
)
@click.option(
    "--slot",
    help="Physical replication slot (default: the plan's wal_receive.slot, else "
    "spark_backup_SOURCE).",
)
@click.option("--create-slot", is_flag=True, help="Create the slot if it does not exist.")
@click.option(
    "--interval",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds between stores of the partial segment: the RPO a lost server has.",
)
@click.option(
    "--max-spool-segments",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="With this many segments waiting for the store, stop receiving: the slot then keeps "
    "the WAL on the server.",
)
@click.option("--status", "show_status", is_flag=True, help="Print the running service's status.")
def wal_receive(
    source: str | None,
    spool: str,
    slot: str | None,
    create_slot: bool,
    interval: float,
    max_spool_segments: int,
    show_status: bool,
) -> None:
    """Stream WAL as the server writes it (pg_receivewal with a replication slot) and store each
    completed segment, and the partial one every --interval, until SIGTERM. Runs as a service
    (systemd, a Kubernetes sidecar): docs/runbooks/postgres.md, Streamed WAL."""
    from spark_backup.sources.postgres import receive

    runtime, chosen = _source(source)
    planned = chosen.wal_receive
    if spool is None:
        if planned is None or planned.spool is None:
            raise UsageError(
                f"wal-receive needs --spool, or wal_receive: spool: PATH for source {chosen.name!r}"
            )
        spool = str(runtime.context(chosen).resolve(planned.spool))
    if show_status:
        click.echo(json.dumps(receive.read_status(Path(spool)), indent=2))
        return
    status = _ops().wal_receive(
        runtime,
        chosen,
        Path(spool),
        slot or (planned and planned.slot) or receive.default_slot(chosen.name),
        interval=interval,
        max_spool_segments=max_spool_segments,
        create_slot=create_slot,
        log=lambda line: stderr.print(printable(line), highlight=False, soft_wrap=True),
    )
    stdout.print(
        f"wal-receive of {status.source} stopped: {status.segments_stored} segments and "
        f"{status.partials_stored} partial segments stored",
        highlight=False,
    )


@click.command("wal-pusher")
@click.argument("source", required=False)
@click.option("--status", "show_status", is_flag=True, help="Print the running service's status.")
def wal_pusher(source: str | None, show_status: bool) -> None:
    """Asynchronous, parallel WAL archiving: store the WAL files archive_command hands over
    through the plan's wal_pusher spool (and those the server marks ready, several at once),
    until SIGTERM. Runs as a service beside the server, as its OS user: docs/runbooks/
    postgres.md, Asynchronous archiving."""
    from spark_backup.sources.postgres import pusher

    runtime, chosen = _source(source)
    if show_status:
        click.echo(json.dumps(pusher.read_status(pusher.spool_of(runtime, chosen)), indent=2))
        return
    status = _ops().wal_pusher(
        runtime,
        chosen,
        log=lambda line: stderr.print(printable(line), highlight=False, soft_wrap=True),
    )
    stdout.print(
        f"wal-pusher of {status.source} stopped: {status.pushed} WAL files stored, "
        f"{status.already_archived} already archived",
        highlight=False,
    )


COMMANDS = (
    wal_push,
    wal_pusher,
    wal_fetch,
    wal_status,
    wal_receive,
    pg_setup_archiving,
    pg_check,
    pg_pitr,
)
