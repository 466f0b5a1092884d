"""``spark-backup``: the command line over the same operations the Dagster layer runs.

Exit codes (scripts may rely on them): 0 success; 1 unexpected error; 2 bad plan or usage;
3 a copy failed verification; 4 not found; 5 store error; 6 source unreadable; 7 restore
refused; 8 key or identity problem; 130 interrupted. Errors are printed as one line on stderr.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from spark_backup.engine.manifest import Manifest
from spark_backup.engine.streams import ProgressCallback
from spark_backup.errors import IntegrityError, SparkBackupError, UsageError
from spark_backup.plan import format_duration
from spark_backup.service import BackupService, CopyRef, WalArchiveStatus
from spark_backup.sources import kind_module
from spark_backup.sources.postgres.pitr import DEFAULT_PORT as DEFAULT_PITR_PORT
from spark_backup.sources.postgres.pitr import LATEST
from spark_backup.sources.postgres.server import conf_value
from spark_backup.sources.postgres.wal import WalNotArchived

# Wide when piped, so tables and ids are not cut at 80 columns in logs.
stdout = Console(width=None if sys.stdout.isatty() else 200)
stderr = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


class _Context:
    def __init__(self, plan_path: str | None, progress: bool):
        self.plan_path = plan_path
        self.progress = progress
        self._service: BackupService | None = None

    @property
    def service(self) -> BackupService:
        if self._service is None:
            self._service = BackupService.from_path(self.plan_path)
        return self._service


pass_context = click.make_pass_decorator(_Context)


@click.group()
@click.option(
    "--plan",
    "plan_path",
    envvar="SPARK_BACKUP_PLAN",
    help="Protection plan (default: spark_backup.yaml; env SPARK_BACKUP_PLAN).",
)
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar (default: on a terminal)."
)
@click.version_option(package_name="spark-backup")
@click.pass_context
def cli(ctx: click.Context, plan_path: str | None, progress: bool | None) -> None:
    """Back up, verify and restore the platform's artifacts under one protection plan."""
    ctx.obj = _Context(plan_path, stderr.is_terminal if progress is None else progress)


@contextmanager
def _progress(enabled: bool, label: str, total: int | None) -> Iterator[ProgressCallback | None]:
    if not enabled:
        yield None
        return
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _fail(error: SparkBackupError) -> None:
    stderr.print(f"[red]error:[/red] {error}", highlight=False, markup=True, soft_wrap=True)
    sys.exit(error.exit_code)


def _run(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except SparkBackupError as error:
        _fail(error)


# --- plan --------------------------------------------------------------------------------------


@cli.group()
def plan() -> None:
    """Inspect the protection plan."""


@plan.command("check")
@click.option("--probe", is_flag=True, help="Also reach every store and read every source path.")
@pass_context
def plan_check(ctx: _Context, probe: bool) -> None:
    """Validate the plan without touching anything (unless --probe)."""

    def check() -> None:
        service = ctx.service
        service.recipients()
        if probe:
            for store in service.all_stores():
                store.check()
            for source in service.plan.sources:
                kind_module(source.kind).probe(source, service.loaded)
        _print_plan(service)

    _run(check)


def _print_plan(service: BackupService) -> None:
    plan = service.plan
    table = Table(
        title=f"{service.loaded.path}: {len(plan.sources)} sources, {len(plan.stores)} stores"
    )
    for column in (
        "source",
        "kind",
        "cadence",
        "store",
        "RPO",
        "RTO",
        "max age",
        "keep d/w/m",
        "owner",
    ):
        table.add_column(column)
    for source in plan.sources:
        retention = plan.retention_for(source)
        table.add_row(
            source.name,
            source.kind,
            source.cadence,
            plan.store_for(source).name,
            format_duration(source.rpo),
            format_duration(source.rto),
            format_duration(plan.max_age_for(source)),
            f"{retention.daily}/{retention.weekly}/{retention.monthly}",
            source.owner,
        )
    stdout.print(table)
    stdout.print("plan is valid")


# --- backup ------------------------------------------------------------------------------------


@cli.command()
@click.argument("sources", nargs=-1)
@click.option("--all", "all_sources", is_flag=True, help="Back up every source in the plan.")
@click.option("--partition", help="Partition key (default: the current day, week or month).")
@click.option(
    "--artifact",
    help="Which artifact of the source (default: its primary one; a postgres source has "
    "'dump' and 'base').",
)
@click.option("--json", "as_json", is_flag=True, help="Print the manifests as JSON.")
@pass_context
def backup(
    ctx: _Context,
    sources: tuple[str, ...],
    all_sources: bool,
    partition: str | None,
    artifact: str | None,
    as_json: bool,
) -> None:
    """Back up SOURCES (new copies each time; existing copies are never replaced). A failing
    source does not stop the others; the exit code is the first failure's."""
    service = _run(lambda: ctx.service)
    names = [s.name for s in service.plan.sources] if all_sources else list(sources)
    if not names:
        raise click.UsageError("name at least one source, or pass --all")
    manifests = []
    failures: list[SparkBackupError] = []
    for name in names:
        try:
            with _progress(ctx.progress, f"backup {name}", None) as progress:
                made = service.backup(name, partition, progress, artifact)
        except SparkBackupError as error:
            stderr.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
            failures.append(error)
            continue
        manifests += made
        for manifest in made:
            _print_backup(manifest, as_json)
    if as_json:
        click.echo(json.dumps([asdict(m) for m in manifests], indent=2))
    if failures:
        sys.exit(failures[0].exit_code)


def _print_backup(manifest: Manifest, as_json: bool) -> None:
    warnings = manifest.source_metadata.get("warning_count", 0)
    if not as_json:
        part = f"  {manifest.part}" if manifest.part else ""
        stdout.print(
            f"{manifest.id}  {manifest.partition}{part}  {_size(manifest.plaintext.bytes)} -> "
            f"{_size(manifest.stored.bytes)}  {manifest.duration_seconds:.1f}s  "
            f"sha256 {manifest.stored.sha256[:16]}..."
            + (f"  {warnings} warning(s)" if warnings else ""),
            highlight=False,
        )
    for warning in manifest.source_metadata.get("warnings", []):
        stderr.print(f"warning: {manifest.source}: {warning}", highlight=False, soft_wrap=True)


# --- list --------------------------------------------------------------------------------------


@cli.command("list")
@click.argument("source", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per copy, as an array.")
@pass_context
def list_(ctx: _Context, source: str | None, as_json: bool) -> None:
    """List committed copies, oldest first."""
    refs: list[CopyRef] = _run(lambda: ctx.service.copies(source))
    if as_json:
        click.echo(json.dumps([_copy_row(r) for r in refs], indent=2))
        return
    table = Table()
    for column in ("id", "source", "part", "partition", "finished", "size", "stored", "store"):
        table.add_column(column, no_wrap=column == "id")
    for ref in refs:
        m = ref.manifest
        table.add_row(
            m.id,
            m.source,
            m.part,
            m.partition,
            m.finished_at[:19],
            _size(m.plaintext.bytes),
            _size(m.stored.bytes),
            ref.store.name,
        )
    stdout.print(table)


def _copy_row(ref: CopyRef) -> dict[str, Any]:
    m = ref.manifest
    return {
        "id": m.id,
        "source": m.source,
        "kind": m.kind,
        "part": m.part,
        "partition": m.partition,
        "started_at": m.started_at,
        "finished_at": m.finished_at,
        "plaintext_bytes": m.plaintext.bytes,
        "plaintext_sha256": m.plaintext.sha256,
        "stored_bytes": m.stored.bytes,
        "stored_sha256": m.stored.sha256,
        "store": ref.store.name,
        "uri": ref.store.object_uri(m.data_key),
        "lock": m.lock,
    }


# --- verify ------------------------------------------------------------------------------------


@cli.command()
@click.argument("selector", required=False, metavar="[SOURCE|ID]")
@click.option(
    "--deep",
    is_flag=True,
    help="Also decrypt and decompress (needs an identity) and check the plaintext.",
)
@click.option(
    "--identity", type=click.Path(dir_okay=False), help="age identity file (implies --deep)."
)
@click.option("--json", "as_json", is_flag=True, help="Results as JSON.")
@pass_context
def verify(
    ctx: _Context, selector: str | None, deep: bool, identity: str | None, as_json: bool
) -> None:
    """Re-read copies and compare them with their manifests. Exit 3 if any copy fails."""
    service = _run(lambda: ctx.service)
    refs: list[CopyRef] = _run(lambda: service.select(selector))
    identities = _run(lambda: service.identities(identity)) if (deep or identity) else None
    outcomes = []
    for ref in refs:
        with _progress(
            # A deep verify counts plaintext bytes, a stored-bytes check counts stored bytes.
            ctx.progress,
            f"verify {ref.manifest.id}",
            (ref.manifest.plaintext if identities else ref.manifest.stored).bytes,
        ) as progress:
            outcome = _run(functools.partial(service.verify, ref, identities, progress))
        outcomes.append(outcome)
        if not as_json:
            status = "[green]ok[/green]" if outcome.ok else "[red]FAILED[/red]"
            detail = f"  {outcome.error}" if outcome.error else ""
            stdout.print(f"{status}  {outcome.copy_id}{detail}", highlight=False, soft_wrap=True)
    failed = [o for o in outcomes if not o.ok]
    if as_json:
        click.echo(json.dumps([asdict(o) for o in outcomes], indent=2))
    elif not outcomes:
        stdout.print("no copies to verify")
    else:
        stdout.print(f"{len(outcomes) - len(failed)} of {len(outcomes)} copies intact")
    if failed:
        sys.exit(IntegrityError.exit_code)


# --- restore -----------------------------------------------------------------------------------


@cli.command()
@click.argument("copy_id")
@click.option("--to", "target", help="Staging folder.")
@click.option(
    "--to-db", "database", help="PostgreSQL dumps: a new database on the source's server."
)
@click.option("--identity", type=click.Path(dir_okay=False), help="age identity file.")
@click.option("--overwrite", is_flag=True, help="Replace files that already exist in the target.")
@click.option(
    "--skip-unsafe", is_flag=True, help="Leave out unsafe archive members instead of refusing."
)
@click.option(
    "--force", is_flag=True, help="--to-db: replace the contents of an existing database."
)
@click.option(
    "--no-owner", is_flag=True, help="--to-db: skip ownership and grants (roles may be missing)."
)
@click.option("--json", "as_json", is_flag=True, help="Summary as JSON.")
@pass_context
def restore(
    ctx: _Context,
    copy_id: str,
    target: str | None,
    database: str | None,
    identity: str | None,
    overwrite: bool,
    skip_unsafe: bool,
    force: bool,
    no_owner: bool,
    as_json: bool,
) -> None:
    """Restore copy COPY_ID into a staging folder (--to, never in place) or, for a PostgreSQL
    dump, into a new database (--to-db)."""
    if (target is None) == (database is None):
        raise click.UsageError("give exactly one of --to DIR or --to-db NAME")
    service = _run(lambda: ctx.service)
    total = _run(lambda: service.find(copy_id)).manifest.plaintext.bytes

    def run() -> dict[str, Any]:
        with _progress(ctx.progress, f"restore {copy_id}", total) as progress:
            if database is not None:
                return service.restore_to_database(
                    copy_id,
                    database,
                    identity_file=identity,
                    force=force,
                    no_owner=no_owner,
                    progress=progress,
                )
            return service.restore(
                copy_id,
                Path(target or "."),
                identity_file=identity,
                overwrite=overwrite,
                skip_unsafe=skip_unsafe,
                progress=progress,
            )

    summary = _run(run)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    if database is not None:
        stdout.print(
            f"restored {copy_id} into database {database}: {summary['tables']} tables, "
            f"{summary['rows']} rows (row counts match the dump) in {summary['seconds']:.1f}s",
            highlight=False,
        )
        return
    stdout.print(
        f"restored {copy_id} into {summary['target']}: {summary['files']} files, "
        f"{summary['directories']} directories, {summary['symlinks']} links, "
        f"{_size(summary['bytes'])} in {summary['seconds']:.1f}s",
        highlight=False,
    )
    for skipped in summary.get("skipped", []):
        stderr.print(f"skipped unsafe member {skipped}", highlight=False)


# --- prune -------------------------------------------------------------------------------------


@cli.command()
@click.option("--apply", is_flag=True, help="Delete; without it, only show what would go.")
@click.option("--json", "as_json", is_flag=True, help="Report as JSON.")
@pass_context
def prune(ctx: _Context, apply: bool, as_json: bool) -> None:
    """Apply retention: expire copies no rule keeps, remove orphans of interrupted backups.
    Copies under an Object Lock are never deleted."""
    report = _run(lambda: ctx.service.prune(dry_run=not apply))
    if as_json:
        click.echo(json.dumps(asdict(report), indent=2))
        return
    verb = "would delete" if report.dry_run else "deleted"
    for copy_id in report.expired:
        stdout.print(f"{verb} {copy_id}", highlight=False)
    for copy_id in report.locked:
        stdout.print(f"kept {copy_id}: expired by retention but under Object Lock", highlight=False)
    for orphan in report.orphans:
        stdout.print(f"{verb} orphaned data {orphan}", highlight=False)
    for upload in report.incomplete_uploads:
        stdout.print(f"aborted incomplete upload {upload}", highlight=False)
    for key in report.wal_expired:
        stdout.print(f"{verb} WAL {key}: older than every base backup kept", highlight=False)
    stdout.print(
        f"{len(report.kept)} kept, {len(report.expired)} expired, {len(report.locked)} locked, "
        f"{len(report.orphans)} orphans{'' if apply else ' (dry run: pass --apply)'}"
    )


# --- postgres ------------------------------------------------------------------------------------

# restore_command: PostgreSQL ends recovery on exit status 1 to 125 (the file is not there) and
# aborts it on a status above 125, as if the command had been killed: a store that cannot be
# reached, or a damaged file, must not pass for the end of the WAL.
WAL_FETCH_MISSING = 1
WAL_FETCH_ABORT = 255


@cli.command("wal-push")
@click.argument("path")
@click.option("--source", help="The PostgreSQL source (default: the plan's only one).")
@pass_context
def wal_push(ctx: _Context, path: str, source: str | None) -> None:
    """Archive one WAL file: archive_command = 'spark-backup --plan PLAN wal-push %p'.
    Pushing a file already archived with the same content succeeds; other content fails."""
    outcome = _run(lambda: ctx.service.wal_push(source, Path(path)))
    if outcome != "archived":
        stderr.print(f"{Path(path).name}: {outcome}", highlight=False)


class _RestoreCommand(click.Command):
    """A command PostgreSQL runs as restore_command: a mistake in its arguments must abort
    recovery (exit 255) like any other failure, not pass for a missing file."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.ClickException as exc:
            exc.exit_code = WAL_FETCH_ABORT
            raise


@cli.command("wal-fetch", cls=_RestoreCommand)
@click.argument("name")
@click.argument("destination")
@click.option("--source", help="The PostgreSQL source (default: the plan's only one).")
@click.option("--identity", type=click.Path(dir_okay=False), help="age identity file.")
@pass_context
def wal_fetch(
    ctx: _Context, name: str, destination: str, source: str | None, identity: str | None
) -> None:
    """Restore one WAL file: restore_command = 'spark-backup --plan PLAN wal-fetch %f %p'.
    Exit 0 restored, 1 not in the archive (recovery ends there), 255 anything else (recovery
    aborts rather than stopping early)."""
    try:
        ctx.service.wal_fetch(source, name, Path(destination), identity)
    except WalNotArchived as error:
        stderr.print(f"{error}", highlight=False, soft_wrap=True)
        sys.exit(WAL_FETCH_MISSING)
    except Exception as error:
        stderr.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(WAL_FETCH_ABORT)


@cli.command("wal-status")
@click.argument("source", required=False)
@click.option("--json", "as_json", is_flag=True, help="Status as JSON.")
@pass_context
def wal_status(ctx: _Context, source: str | None, as_json: bool) -> None:
    """How far the WAL archive lags behind the server, against the RPO. Exit 3 if beyond it."""
    status = _run(lambda: ctx.service.wal_archive_status(source))
    row = wal_status_row(status)
    if as_json:
        click.echo(json.dumps(row, indent=2))
    else:
        lag = "none archived" if status.lag is None else f"{row['lag_seconds']:.0f} s"
        stdout.print(
            f"{'ok' if status.ok else 'BEHIND'}  {status.source}: archive lag {lag} "
            f"(RPO {format_duration(status.rpo)}), newest {row['newest_segment']}"
            + (f"; server: {status.server_error}" if status.server_error else ""),
            highlight=False,
        )
    if not status.ok:
        sys.exit(IntegrityError.exit_code)


def wal_status_row(status: WalArchiveStatus) -> dict[str, Any]:
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
    }


@cli.command("pg-setup-archiving")
@click.argument("source", required=False)
@click.option("--apply", is_flag=True, help="ALTER SYSTEM on the server (needs a superuser).")
@pass_context
def pg_setup_archiving(ctx: _Context, source: str | None, apply: bool) -> None:
    """Print (or apply) the server settings for continuous archiving into the plan's store."""
    service = _run(lambda: ctx.service)
    settings = _run(lambda: service.archiving_settings(source))
    if not apply:
        for name, value in settings.items():
            stdout.print(f"{name} = {conf_value(value)}", highlight=False, soft_wrap=True)
        stdout.print(
            "# put these in postgresql.conf (or run with --apply), then restart PostgreSQL",
            highlight=False,
        )
        return
    restart = _run(lambda: service.apply_archiving_settings(source, settings))
    stdout.print(
        "applied with ALTER SYSTEM; "
        + (f"restart PostgreSQL for {', '.join(restart)}" if restart else "reloaded"),
        highlight=False,
    )


@cli.command("pg-pitr")
@click.argument("source", required=False)
@click.option(
    "--to-time",
    "to_time",
    required=True,
    help="ISO 8601 time (without a zone it is UTC), or 'latest': all archived WAL.",
)
@click.option("--target-dir", required=True, help="A new or empty folder for the cluster.")
@click.option("--port", default=DEFAULT_PITR_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option("--identity", type=click.Path(dir_okay=False), help="age identity file.")
@click.option("--stop", "stop_after", is_flag=True, help="Stop the cluster after verifying it.")
@click.option("--json", "as_json", is_flag=True, help="Report as JSON.")
@pass_context
def pg_pitr(
    ctx: _Context,
    source: str | None,
    to_time: str,
    target_dir: str,
    port: int,
    identity: str | None,
    stop_after: bool,
    as_json: bool,
) -> None:
    """Recover SOURCE to a point in time in a new cluster (base backup plus archived WAL),
    start it on a local socket in TARGET_DIR and verify it. Production is not touched."""
    target_time = None if to_time == LATEST else _run(lambda: parse_time(to_time))
    report = _run(
        lambda: ctx.service.pitr(
            source,
            target_time,
            Path(target_dir),
            port=port,
            identity_file=identity,
            stop_after=stop_after,
        )
    )
    if as_json:
        click.echo(json.dumps(asdict(report), indent=2))
        return
    tables = sum(len(d["row_counts"]) for d in report.databases.values())
    stdout.print(
        f"recovered {report.source} to {report.target_time} (last transaction replayed: "
        f"{report.recovered_to or 'none after the base backup'}) from "
        f"{report.base_copy_id} with {report.wal_files} WAL files in "
        f"{sum(report.seconds.values()):.1f}s; {len(report.databases)} databases, {tables} "
        f"tables readable",
        highlight=False,
    )
    if not stop_after:
        stdout.print(f"running: {report.connect_hint()}", highlight=False)


def parse_time(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--to-time {text!r} is not an ISO 8601 time (e.g. 2026-11-27T09:30:00Z)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


# --- dagster ------------------------------------------------------------------------------------


@cli.command("dagster-init")
@click.option(
    "--config",
    "template",
    type=click.Path(dir_okay=False, exists=True),
    help="Instance config to install into $DAGSTER_HOME if it has none "
    "(default: spark-backup's dagster.yaml).",
)
@pass_context
def dagster_init(ctx: _Context, template: str | None) -> None:
    """Prepare the Dagster instance at $DAGSTER_HOME for the plan: install dagster.yaml if
    missing and give every source its pool limit (one backup of a source at a time)."""
    import os

    from dagster import DagsterInstance

    from spark_backup.defs.instance import ensure_source_pools, install_instance_config

    home = os.environ.get("DAGSTER_HOME")
    if not home:
        raise click.UsageError("set DAGSTER_HOME to the instance's folder")
    service = _run(lambda: ctx.service)
    if _run(lambda: install_instance_config(Path(home), Path(template) if template else None)):
        stdout.print(f"installed {template or 'dagster.yaml'} into {home}", highlight=False)
    with DagsterInstance.get() as instance:
        pools = ensure_source_pools(instance, service.plan)
    stdout.print(
        f"pools set to one run at a time: {', '.join(pools) or 'none needed'}", highlight=False
    )


# --- demo --------------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--home",
    default=".spark_backup",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the demo keeps its estate, key, store and Dagster instance.",
)
def demo(home: str) -> None:
    """Back up, verify and restore a sample estate through Dagster, on the embedded defaults."""
    from spark_backup.demo import run_demo  # Dagster loads only for the demo

    _run(lambda: run_demo(Path(home), stdout))


def _size(value: int) -> str:
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def main() -> None:
    try:
        code = cli.main(prog_name="spark-backup", standalone_mode=False)
    except click.exceptions.Abort:  # Ctrl-C: click turns KeyboardInterrupt into Abort
        stderr.print("interrupted: nothing unfinished was published", highlight=False)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
