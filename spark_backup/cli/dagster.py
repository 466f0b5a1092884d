"""Commands that run Dagster: preparing an instance, and the demo."""

from __future__ import annotations

import os
from pathlib import Path

import click

from spark_backup.cli.app import CliState, cli, pass_state
from spark_backup.console import stdout


@cli.command("dagster-init")
@click.option(
    "--config",
    "template",
    type=click.Path(dir_okay=False, exists=True),
    help="Instance config to install into $DAGSTER_HOME if it has none "
    "(default: spark-backup's dagster.yaml, SQLite under $DAGSTER_HOME).",
)
@click.option(
    "--postgres",
    metavar="URL",
    help="Install the shared-installation config instead: PostgreSQL storage at "
    "postgresql://USER@HOST:PORT/DB (password from $DAGSTER_PG_PASSWORD, never in the URL), "
    "queued runs with limits, run retries and run monitoring. See docs/deploy.md.",
)
@pass_state
def dagster_init(state: CliState, template: str | None, postgres: str | None) -> None:
    """Prepare the Dagster instance at $DAGSTER_HOME for the plan: install dagster.yaml if
    missing, create its storage and give every source its pool limit (one backup of a source
    at a time)."""
    from spark_backup.defs.instance import prepare_instance  # Dagster loads only here

    home = os.environ.get("DAGSTER_HOME")
    if not home:
        raise click.UsageError("set DAGSTER_HOME to the instance's folder")
    if template and postgres:
        raise click.UsageError("give --config or --postgres, not both")
    installed, pools = prepare_instance(
        Path(home), state.service.plan, Path(template) if template else None, postgres
    )
    if installed:
        what = "the PostgreSQL instance config" if postgres else template or "dagster.yaml"
        stdout.print(f"installed {what} into {home}", highlight=False)
    stdout.print(
        f"pools set to one run at a time: {', '.join(pools) or 'none needed'}", highlight=False
    )


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
    from spark_backup.demo import run_demo

    run_demo(Path(home), stdout.console)


@cli.command("dagster-snapshot")
@click.option(
    "--to",
    "target",
    required=True,
    type=click.Path(file_okay=False),
    help="A new folder for the snapshot (back it up with a config_archive source).",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was copied as JSON.")
def dagster_snapshot(target: str, as_json: bool) -> None:
    """Copy the Dagster instance at $DAGSTER_HOME (SQLite storage) consistently into a new
    folder, databases through SQLite's online backup API while Dagster runs; the rollback
    plan backs the folder up and restores it (docs/runbooks/rollback.md)."""
    import json

    from spark_backup.service.instance_snapshot import snapshot_instance

    home = os.environ.get("DAGSTER_HOME")
    if not home:
        raise click.UsageError("set DAGSTER_HOME to the instance's folder")
    report = snapshot_instance(Path(home), Path(target))
    if as_json:
        click.echo(json.dumps(vars(report), indent=2))
        return
    stdout.print(
        f"snapshot of {home} in {report.target}: {len(report.databases)} databases, "
        f"{len(report.files)} other files",
        highlight=False,
    )
