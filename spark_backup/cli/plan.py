"""``plan check``: validate the plan, and with ``--probe`` reach every store and source."""

from __future__ import annotations

import click

from spark_backup.cli.app import CliState, cli, pass_state
from spark_backup.console import stdout


@cli.group()
def plan() -> None:
    """Inspect the protection plan."""


@plan.command("check")
@click.option("--probe", is_flag=True, help="Also reach every store and read every source.")
@pass_state
def plan_check(state: CliState, probe: bool) -> None:
    """Validate the plan without touching anything (unless --probe)."""
    from rich.table import Table

    from spark_backup.engine.settings import format_duration

    service = state.service
    service.recipients()
    from spark_backup.engine.stores.config import S3StoreConfig

    if any(isinstance(store, S3StoreConfig) for store in service.plan.stores):
        # A run's S3 stores get their clients from dagster-aws resources: their configuration
        # must not contradict the plan's store entries.
        from spark_backup.defs.resources import platform_s3_resources, s3_store_resources

        s3_store_resources(service.plan, platform_s3_resources())
    if probe:
        for store in service.all_stores():
            store.check()
        for source in service.plan.sources:
            service.kind_of(source).probe(source, service.context(source))
    plan = service.plan
    table = Table(
        title=f"{service.loaded.path}: {len(plan.sources)} sources, {len(plan.stores)} stores"
    )
    for column in (
        "source",
        "kind",
        "artifacts",
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
            ", ".join(f"{a.name} ({a.cadence})" for a in service.artifacts(source)),
            plan.store_for(source).name,
            format_duration(source.rpo),
            format_duration(source.rto),
            format_duration(plan.max_age_for(source)),
            f"{retention.daily}/{retention.weekly}/{retention.monthly}",
            source.owner,
        )
    stdout.print(table)
    stdout.print("plan is valid")
