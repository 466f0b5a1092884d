"""``secrets status``: every secret the plan names, with its version, age and rotation verdict;
never its value."""

from __future__ import annotations

import json
import sys

import click

from spark_backup.cli.app import CliState, cli, pass_state
from spark_backup.console import printable, stdout
from spark_backup.errors import SecretError


@cli.group()
def secrets() -> None:
    """The secrets the plan names (by reference, never by value)."""


@secrets.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per secret, as an array.")
@pass_state
def secrets_status(state: CliState, as_json: bool) -> None:
    """List each referenced secret with its backend, version and age. Exits 9 if one cannot
    be read or fails the rotation rule, 10 if the backend is sealed or unreachable."""
    statuses = state.service.secrets_status()
    rows = [
        {
            "field": s.path,
            "reference": str(s.ref),
            "backend": s.ref.scheme,
            "version": s.finding.secret.version if s.finding else None,
            "age_days": s.finding.age.days if s.finding and s.finding.age else None,
            "rotation": s.finding.verdict if s.finding else "unreadable",
            "failed": s.failed,
            "detail": s.error or (s.finding.reason if s.finding else ""),
        }
        for s in statuses
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        from rich.table import Table

        policy = state.service.rotation_policy()
        table = Table(title=f"{len(rows)} secrets; rotation limit {policy.max_age.days} days")
        for column in ("field", "reference", "version", "age (days)", "rotation"):
            table.add_column(column)
        for row in rows:
            verdict = row["rotation"] if not row["failed"] else f"[red]{row['rotation']}[/red]"
            table.add_row(
                printable(row["field"]),
                printable(row["reference"]),
                "-" if row["version"] is None else str(row["version"]),
                "-" if row["age_days"] is None else str(row["age_days"]),
                verdict,
            )
        stdout.print(table)
        for row in rows:
            if row["failed"]:
                stdout.print(
                    f"{printable(row['field'])}: {printable(row['detail'])}", highlight=False
                )
    if any(row["failed"] for row in rows):
        sys.exit(SecretError.exit_code)


@secrets.command("rotate-key")
@pass_state
def secrets_rotate_key(state: CliState) -> None:
    """Add a new age identity to the one in Vault (encryption.identity) and print its recipient.
    The secret keeps the old identities, so copies encrypted to them still restore until they
    expire; put the new recipient into encryption.recipients in place of the old one."""
    new, old, version = state.service.rotate_identity()
    stdout.print(
        f"new recipient: {new}\n"
        f"encryption.identity now holds {len(old) + 1} identities (secret version {version}).\n"
        f"Next: replace {', '.join(old)} with {new} in encryption.recipients; keep the old "
        "identities in the secret until the last copy encrypted to them has expired.",
        highlight=False,
    )
