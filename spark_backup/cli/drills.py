"""``spark-backup drill``: the restore drill the Dagster drill assets run, from the shell;
``spark-backup disaster-drill``: the monthly disaster drill."""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import TYPE_CHECKING

import click

from spark_backup.cli.app import CliState, cli, pass_state
from spark_backup.console import error_line, printable, stdout
from spark_backup.errors import IntegrityError

# The service and the engine load when the command runs, not when the command line starts.
if TYPE_CHECKING:
    from spark_backup.service.disaster import DisasterReport
    from spark_backup.service.drills import DrillReport

DRILL_FAILED_EXIT = IntegrityError.exit_code


@cli.command()
@click.argument("source")
@click.option("--partition", help="Partition to drill (default: the newest that has a copy).")
@click.option("--artifact", help="Which artifact of the source (default: its primary one).")
@click.option("--identity", type=click.Path(dir_okay=False), help="age identity file.")
@click.option(
    "--staging",
    type=click.Path(file_okay=False),
    help="Folder to make the drill's own staging folder in (default: the system's temp).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the drill report as JSON.")
@pass_state
def drill(
    state: CliState,
    source: str,
    partition: str | None,
    artifact: str | None,
    identity: str | None,
    staging: str | None,
    as_json: bool,
) -> None:
    """Restore SOURCE's newest copies of a partition into fresh staging, run its kind's
    semantic check, time it against the RTO, tear the staging down and record the drill beside
    each copy (``list`` shows it). Exit 3 if the drill failed or exceeded the RTO."""
    report = state.service.drill(
        source, artifact, partition, identity_file=identity, staging_root=staging
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_drill(report)
    for error in report.journal_errors:
        error_line(error)
    if not (report.passed and report.within_rto):
        sys.exit(DRILL_FAILED_EXIT)


def print_drill(report: DrillReport) -> None:
    from spark_backup.engine.settings import format_duration

    for step in report.steps:
        verdict = "ok  " if step.passed else "FAIL"
        part = f" {printable(step.part)}" if step.part else ""
        stdout.print(
            f"{verdict} {step.copy_id}{part}  {step.check}  {step.seconds:.1f}s  "
            f"{printable(step.description)}",
            highlight=False,
            soft_wrap=True,
        )
    rto = format_duration(dt.timedelta(seconds=report.rto_seconds))
    verdict = "passed" if report.passed and report.within_rto else "FAILED"
    torn = "staging removed" if report.torn_down else f"STAGING LEFT: {report.teardown_error}"
    stdout.print(
        f"drill {verdict}: {report.source} partition {report.partition}, restore "
        f"{report.restore_seconds:.1f}s of RTO {rto}; {torn}",
        highlight=False,
    )
    for written in report.journal:
        stdout.print(f"journal: {printable(written)}", highlight=False, soft_wrap=True)


@cli.command("disaster-drill")
@click.option(
    "--staging",
    type=click.Path(file_okay=False),
    help="Folder to make the drill's own staging folders in (default: the system's temp).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the drill report as JSON.")
@pass_state
def disaster_drill(state: CliState, staging: str | None, as_json: bool) -> None:
    """The monthly disaster drill: restore the newest copy of every critical source, restart
    the service (the plan's disaster_drill.restart), time every step and the total against the
    plan's disaster_drill.rto, and write the report to the journal. Exit 3 if it failed."""
    report = state.service.disaster_drill(staging_root=staging)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_disaster_drill(report)
    for error in report.journal_errors:
        error_line(error)
    if not report.passed:
        sys.exit(DRILL_FAILED_EXIT)


def print_disaster_drill(report: DisasterReport) -> None:
    from spark_backup.engine.settings import format_duration

    for step in report.steps:
        verdict = "ok  " if step.passed else "FAIL"
        stdout.print(
            f"{verdict} {printable(step.name)}  {step.seconds:.1f}s  {printable(step.description)}",
            highlight=False,
            soft_wrap=True,
        )
    rto = format_duration(dt.timedelta(seconds=report.rto_seconds))
    verdict = "passed" if report.passed else "FAILED"
    stdout.print(
        f"disaster drill {verdict}: total {report.total_seconds:.1f}s of RTO {rto}",
        highlight=False,
    )
    for reason in report.reasons():
        stdout.print(f"  {printable(reason)}", highlight=False, soft_wrap=True)
    for written in report.journal:
        stdout.print(f"journal: {printable(written)}", highlight=False, soft_wrap=True)
