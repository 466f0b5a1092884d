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
    "(default: spark-backup's dagster.yaml).",
)
@pass_state
def dagster_init(state: CliState, template: str | None) -> None:
    """Prepare the Dagster instance at $DAGSTER_HOME for the plan: install dagster.yaml if
    missing and give every source its pool limit (one backup of a source at a time)."""
    from spark_backup.defs.instance import prepare_instance  # Dagster loads only here

    home = os.environ.get("DAGSTER_HOME")
    if not home:
        raise click.UsageError("set DAGSTER_HOME to the instance's folder")
    installed, pools = prepare_instance(
        Path(home), state.service.plan, Path(template) if template else None
    )
    if installed:
        stdout.print(f"installed {template or 'dagster.yaml'} into {home}", highlight=False)
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
