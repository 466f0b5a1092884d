"""``spark-backup replicate``: push copies to their replication targets and check the replicas,
as the Dagster replica assets do."""

from __future__ import annotations

import json
import sys

import click

from spark_backup.cli.app import CliState, cli, pass_state
from spark_backup.console import error_line, print_columns, printable
from spark_backup.errors import StoreError

UNREPLICATED_EXIT = StoreError.exit_code


@cli.command()
@click.argument("sources", nargs=-1)
@click.option("--partition", help="Only this partition's copies (and any not yet replicated).")
@click.option("--artifact", help="Which artifact of the source (default: all).")
@click.option(
    "--check-only", is_flag=True, help="Push nothing: compare the replicas with the versions."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per copy and target.")
@pass_state
def replicate(
    state: CliState,
    sources: tuple[str, ...],
    partition: str | None,
    artifact: str | None,
    check_only: bool,
    as_json: bool,
) -> None:
    """Push every copy of SOURCES (default: every source with ``replicate_to``) that a target
    lacks, then compare each replica's digests with its version. A target that is down leaves
    its versions unreplicated (recorded; the next run pushes them again); nothing is deleted.
    Exit 5 if any version is unreplicated."""
    service = state.service
    names = list(sources) or service.replicated_sources()
    outcomes = []
    for name in names:
        if not check_only:
            service.replicate(name, artifact, partition)
        outcomes += service.check_replicas(name, artifact, partition)
    if as_json:
        click.echo(json.dumps([o.to_dict() for o in outcomes], indent=2))
    else:
        print_columns(
            ("version", "target", "replicated", "location"),
            ((o.version, o.target, "yes" if o.replicated else "NO", o.location) for o in outcomes),
        )
    for outcome in outcomes:
        if not outcome.replicated:
            error_line(
                f"{outcome.version} not replicated to {outcome.target}: "
                f"{printable(outcome.problem or '')}"
            )
    if any(not o.replicated for o in outcomes):
        sys.exit(UNREPLICATED_EXIT)
