"""The ``spark-backup`` command: the root group, the one place errors become exit codes, and the
commands every kind contributes.

Exit codes (scripts may rely on them): 0 success; 1 unexpected error; 2 bad plan or usage;
3 a copy failed verification; 4 not found; 5 store error; 6 source unreadable; 7 restore
refused; 8 key or identity problem; 9 secret problem; 10 secrets backend sealed or unreachable;
11 signature refused (a forged or altered copy); 130 interrupted. Errors are printed as one line on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click

from spark_backup.console import error_line, stderr
from spark_backup.errors import SparkBackupError
from spark_backup.sources.base import RuntimeHolder

INTERRUPTED = 130


class CliState(RuntimeHolder):
    """What every command finds on click's context: the plan (opened on first use)."""

    def __init__(self, plan_path: str | None, progress: bool):
        self.plan_path = plan_path
        self.progress = progress
        self._service = None

    @property
    def service(self):
        if self._service is None:
            from spark_backup.service import BackupService

            self._service = BackupService.from_path(self.plan_path)
        return self._service

    @property
    def runtime(self):
        return self.service


pass_state = click.make_pass_decorator(CliState)


class SparkBackupGroup(click.Group):
    """The core commands, then every registered kind's own; kinds load only when a command
    that is not a core one is asked for."""

    def _kind_commands(self) -> dict[str, click.Command]:
        from spark_backup.sources import registry

        commands: dict[str, click.Command] = {}
        for kind in registry.kinds().values():
            for command in kind.cli_commands():
                assert command.name is not None
                commands[command.name] = command
        return commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._kind_commands()})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return super().get_command(ctx, name) or self._kind_commands().get(name)


@click.group(cls=SparkBackupGroup)
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
    ctx.obj = CliState(plan_path, stderr.is_terminal if progress is None else progress)


@contextmanager
def progress_bar(enabled: bool, label: str, total: int | None) -> Iterator:
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

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


def main() -> None:
    try:
        code = cli.main(prog_name="spark-backup", standalone_mode=False)
    except SparkBackupError as error:
        error_line(error)
        sys.exit(error.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        stderr.print("interrupted: nothing unfinished was published", highlight=False)
        sys.exit(INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
