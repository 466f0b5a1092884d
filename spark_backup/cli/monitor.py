"""``spark-backup monitor``: KPIs per source (``service/kpis.py``) as a table, JSON, or the
Prometheus text format for node-exporter's textfile collector."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from spark_backup.cli.app import CliState, cli, pass_state
from spark_backup.console import size, stdout

# rich and the service load when the command runs, not when the command line starts.
if TYPE_CHECKING:
    from rich.table import Table

    from spark_backup.service.kpis import Kpi, KpiPeriod


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per source artifact.")
@click.option("--prometheus", is_flag=True, help="Prometheus text format (node-exporter textfile).")
@click.option(
    "--history",
    type=click.Choice(["day", "week", "month"]),
    help="The KPI history per source and period: success rate, verified rate, drill times.",
)
@pass_state
def monitor(state: CliState, as_json: bool, prometheus: bool, history: str | None) -> None:
    """Last success, backup duration, volume, compression and the last drill with its restore
    time beside the RTO, per source artifact (``--history``: per day, week or month)."""
    if history:
        periods = state.service.kpi_history((history,))
        if as_json:
            click.echo(json.dumps([row.to_dict() for row in periods], indent=2))
        else:
            stdout.print(history_table(periods))
        return
    rows = state.service.kpis()
    if as_json:
        click.echo(json.dumps([row.to_dict() for row in rows], indent=2))
        return
    if prometheus:
        from spark_backup.service.kpis import prometheus_text

        click.echo(prometheus_text(rows), nl=False)
        return
    stdout.print(kpi_table(rows))


def kpi_table(rows: list[Kpi]) -> Table:
    """The KPIs as a table (``monitor`` and the demo)."""
    from rich.table import Table

    table = Table()
    for column in (
        "source",
        "artifact",
        "last success",
        "age",
        "duration",
        "volume",
        "stored",
        "ratio",
        "last drill",
        "restore / RTO",
    ):
        table.add_column(column)
    for row in rows:
        drill = "-"
        if row.last_drill:
            drill = f"{row.last_drill[:19]} {'passed' if row.drill_passed else 'FAILED'}"
        table.add_row(
            row.source,
            row.artifact,
            row.last_success[:19] if row.last_success else "never",
            f"{row.age_hours:.1f} h" if row.age_hours is not None else "-",
            f"{row.duration_seconds:.1f} s" if row.duration_seconds is not None else "-",
            size(row.bytes) if row.bytes is not None else "-",
            size(row.stored_bytes) if row.stored_bytes is not None else "-",
            f"{row.compression_ratio:.2f}" if row.compression_ratio else "-",
            drill,
            (
                f"{row.restore_seconds:.1f} s / {row.rto_seconds / 3600:g} h"
                if row.restore_seconds is not None
                else f"- / {row.rto_seconds / 3600:g} h"
            ),
        )
    return table


def history_table(rows: list[KpiPeriod]) -> Table:
    from rich.table import Table

    table = Table()
    for column in (
        "source",
        "period",
        "backups",
        "failed runs",
        "success",
        "verified",
        "drills",
        "restore max / RTO",
    ):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.source,
            row.key,
            str(row.backups),
            str(row.failed_runs),
            f"{100 * row.success_rate:.1f} %" if row.success_rate is not None else "-",
            f"{100 * row.verified_rate:.1f} %" if row.verified_rate is not None else "-",
            f"{row.drills_passed}/{row.drills}",
            (
                f"{row.restore_seconds_max:.1f} s / {row.rto_seconds / 3600:g} h"
                if row.restore_seconds_max is not None
                else f"- / {row.rto_seconds / 3600:g} h"
            ),
        )
    return table
