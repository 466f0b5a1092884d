"""``spark-backup alerts [--dry-run]``: stale copies, failed or overdue drills and log lag,
sent as tickets and email to the security team (``service/alerts.py``)."""

from __future__ import annotations

import json

import click

from spark_backup.cli.app import CliState, cli, pass_state
from spark_backup.console import printable, stderr, stdout


@cli.command()
@click.option("--dry-run", is_flag=True, help="Print what would be sent; send nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the alerts as JSON.")
@pass_state
def alerts(state: CliState, dry_run: bool, as_json: bool) -> None:
    """Warn about every artifact without a copy younger than its max_age (24 h unless the plan
    says otherwise), failed or overdue restore drills, and a log behind its RPO; open or
    comment on a ticket and email the security team for each (``--dry-run``: only print)."""
    service = state.service
    found = service.evaluate_alerts()
    if dry_run:
        actions = service.preview_alerts(found)
    else:
        outcomes = service.send_alerts(found)
        actions = [
            f"{o.action}{' ' + o.ticket if o.ticket else ''}" + ("; emailed" if o.emailed else "")
            for o in outcomes
        ]
        for outcome in outcomes:
            if outcome.warning:
                stderr.print(f"warning: {printable(outcome.warning)}", highlight=False)
    if as_json:
        rows = [
            {
                "source": a.failure.source,
                "check": a.failure.check,
                "partition": a.failure.partition,
                "summary": a.failure.summary,
                ("would" if dry_run else "did"): action,
            }
            for a, action in zip(found, actions, strict=True)
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    if not found:
        stdout.print("no alerts: every copy is fresh, every drill recent and passed")
        return
    for alert, action in zip(found, actions, strict=True):
        stdout.print(printable(alert.line), highlight=False, soft_wrap=True)
        stdout.print(
            f"  {'would' if dry_run else 'did'}: {printable(action)}",
            highlight=False,
            soft_wrap=True,
        )
    stdout.print(f"{len(found)} alert(s){' (dry run: nothing sent)' if dry_run else ''}")
