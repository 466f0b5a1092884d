"""MongoDB's own commands: the oplog slices' lag, and point-in-time restore."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from spark_backup.console import parse_time, printable, stdout
from spark_backup.errors import IntegrityError
from spark_backup.sources.holder import current_runtime
from spark_backup.sources.mongodb.pitr_options import LATEST

# ``--help`` imports this module; the kind, its operations and pymongo load when a command runs.


def _source(name: str | None) -> Any:
    from spark_backup.sources.mongodb import KIND, ops

    runtime = current_runtime()
    return runtime, KIND, ops.mongo_source(runtime, KIND, name)


@click.command("oplog-status")
@click.argument("source", required=False)
@click.option("--json", "as_json", is_flag=True, help="Status as JSON.")
def oplog_status(source: str | None, as_json: bool) -> None:
    """How far the saved oplog slices lag behind the replica set, against the RPO; gaps and a
    rolled-over oplog. Exit 3 if beyond the RPO or broken."""
    from spark_backup.engine.cadence import utcnow
    from spark_backup.engine.settings import format_duration

    runtime, kind, chosen = _source(source)
    status = kind.lag(runtime, chosen, utcnow())
    lag = None if status.lag is None else status.lag.total_seconds()
    if as_json:
        row = {
            "source": status.source,
            "ok": status.ok,
            "lag_seconds": lag,
            "rpo_seconds": status.rpo.total_seconds(),
            "newest_slice": status.newest,
            "problems": status.problems,
            "server_error": status.source_error,
            **status.details,
        }
        click.echo(json.dumps(row, indent=2))
    else:
        shown = "nothing saved" if lag is None else f"{lag:.0f} s"
        stdout.print(
            f"{'ok' if status.ok else 'BEHIND'}  {status.source}: oplog lag {shown} (RPO "
            f"{format_duration(status.rpo)}), newest slice {status.newest or 'none'}"
            + "".join(f"; {printable(p)}" for p in status.problems)
            + (f"; server: {printable(status.source_error)}" if status.source_error else ""),
            highlight=False,
        )
    if not status.ok:
        sys.exit(IntegrityError.exit_code)


@click.command("mongo-pitr")
@click.argument("source", required=False)
@click.option(
    "--to-time",
    "to_time",
    required=True,
    help="ISO 8601 time (without a zone it is UTC), or 'latest': the end of the saved oplog.",
)
@click.option("--to-db", "to_db", required=True, help="New database NAME, or SRC=DST,...")
@click.option("--report-dir", default=".", show_default=True, help="Where mongo-pitr.json goes.")
@click.option("--identity", type=click.Path(dir_okay=False), help="age identity file.")
@click.option("--json", "as_json", is_flag=True, help="Report as JSON.")
def mongo_pitr(
    source: str | None,
    to_time: str,
    to_db: str,
    report_dir: str,
    identity: str | None,
    as_json: bool,
) -> None:
    """Restore SOURCE to a point in time into new databases: the newest dump before it, then
    the oplog slices up to it, replayed in order. The source's databases are not touched."""
    from spark_backup.sources.base import RecoveryTarget

    runtime, kind, chosen = _source(source)
    target = RecoveryTarget(None if to_time == LATEST else parse_time(to_time), into=to_db)
    report = kind.recover(runtime, chosen, target, Path(report_dir), identity_file=identity)
    if as_json:
        click.echo(json.dumps(asdict(report), indent=2))
        return
    stdout.print(
        f"restored {report.source} to {report.target_time}: reached oplog timestamp "
        f"{report.reached_ts} ({report.reached_time}) from dump {report.base_copy_id} and "
        f"{len(report.slices)} slices ({report.entries_applied} entries) in "
        f"{report.seconds:.1f}s; {sum(report.documents.values())} documents in "
        f"{', '.join(report.databases.values())}",
        highlight=False,
    )


COMMANDS = (oplog_status, mongo_pitr)
