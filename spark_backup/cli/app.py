"""The ``spark-backup`` command: the root group, the one place errors become exit codes, and the
commands every kind contributes.

Exit codes (scripts may rely on them): 0 success; 1 unexpected error; 2 bad plan or usage;
3 a copy failed verification; 4 not found; 5 store error; 6 source unreadable; 7 restore
refused; 8 key or identity problem; 9 secret problem; 10 secrets backend sealed or unreachable;
11 signature refused (a forged or altered copy); 130 interrupted. Errors are printed as one line on stderr.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import click

from spark_backup.console import error_line, stderr
from spark_backup.engine.gc_pause import startup_done
from spark_backup.errors import SparkBackupError
from spark_backup.sources.holder import RuntimeHolder


class CliState(RuntimeHolder):
    """What every command finds on click's context: the plan (opened on first use)."""

    def __init__(self, plan_path: str | None, progress: bool | None):
        self.plan_path = plan_path
        self._progress = progress
        self._service = None
        self._runtime = None

    @property
    def progress(self) -> bool:
        """Whether to draw progress bars: as asked, else when stderr is a terminal (asking
        rich loads it, so commands that draw none never do)."""
        if self._progress is None:
            self._progress = stderr.is_terminal
        return self._progress

    @property
    def service(self):
        """Every operation of the plan (alerts, drills, retention, ...): imports them all."""
        if self._service is None:
            from spark_backup.service import BackupService

            if self._runtime is not None:  # the plan read once per command
                self._service = BackupService(self._runtime.loaded)
            else:
                self._service = BackupService.from_path(self.plan_path)
            startup_done()
        return self._service

    @property
    def listing_service(self):
        """The plan opened with what ``list`` shows beside each copy (locks, drills,
        replicas), without the service's other concerns, so ``list`` imports none of them."""
        if self._service is not None:
            return self._service
        from spark_backup.service.listing import ListingOperations

        if self._runtime is not None:  # the plan read once per command
            return ListingOperations(self._runtime.loaded)
        listing = ListingOperations.from_path(self.plan_path)
        startup_done()
        return listing

    @property
    def copy_service(self):
        """The plan opened with what ``backup``, ``verify`` and ``restore`` do (copies, their
        journal and locks), without the service's other concerns (alerts, drills, the ticket
        desk, ...): those commands import none of them. Kept, so that ``service`` (asked for on
        a failure) reads the plan no second time."""
        if self._service is not None:
            return self._service
        from spark_backup.service.copies import CopyOperations

        if not isinstance(self._runtime, CopyOperations):
            if self._runtime is not None:  # the plan read once per command
                self._runtime = CopyOperations(self._runtime.loaded)
            else:
                self._runtime = CopyOperations.from_path(self.plan_path)
            startup_done()
        return self._runtime

    @property
    def runtime(self):
        """The plan opened, as a kind's own commands use it: without the service's other
        concerns, so ``wal-push`` (run for every WAL segment) imports none of them."""
        if self._service is not None:
            return self._service
        if self._runtime is None:
            from spark_backup.service.runtime import PlanRuntime

            self._runtime = PlanRuntime.from_path(self.plan_path)
            startup_done()
        return self._runtime


pass_state = click.make_pass_decorator(CliState)


# Each core command by the module that defines it: a module is imported when one of its commands
# runs (or ``--help`` lists them all), so ``wal-push``, run for every WAL segment, builds none of
# them. ``test_cli_startup`` holds this table equal to what the modules register.
CORE_COMMANDS = {
    "alerts": "spark_backup.cli.alerts",
    "backup": "spark_backup.cli.copies",
    "erase": "spark_backup.cli.copies",
    "list": "spark_backup.cli.copies",
    "prune": "spark_backup.cli.copies",
    "restore": "spark_backup.cli.copies",
    "verify": "spark_backup.cli.copies",
    "dagster-init": "spark_backup.cli.dagster",
    "dagster-snapshot": "spark_backup.cli.dagster",
    "demo": "spark_backup.cli.dagster",
    "disaster-drill": "spark_backup.cli.drills",
    "drill": "spark_backup.cli.drills",
    "monitor": "spark_backup.cli.monitor",
    "plan": "spark_backup.cli.plan",
    "replicate": "spark_backup.cli.replication",
    "secrets": "spark_backup.cli.secrets",
}


class SparkBackupGroup(click.Group):
    """The core commands (each module imported when one of its commands is asked for), then
    every registered kind's own (found without loading the kinds, see ``registry.commands``)."""

    def _core_command(self, name: str) -> click.Command | None:
        if name not in self.commands and name in CORE_COMMANDS:
            from importlib import import_module

            import_module(CORE_COMMANDS[name])  # its decorators add it to ``self.commands``
        return self.commands.get(name)

    def _kind_commands(self) -> dict[str, click.Command]:
        from spark_backup.sources import registry

        commands: dict[str, click.Command] = {}
        for command in registry.commands():
            assert command.name is not None
            commands[command.name] = command
        return commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*CORE_COMMANDS, *super().list_commands(ctx), *self._kind_commands()})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        from spark_backup.sources import registry

        found = self._core_command(name) or registry.command(name)
        if found is None:
            # Not indexed (a kind without its commands entry point, or an install whose
            # metadata predates it): the kinds themselves are asked, at the kinds' cost.
            registry.kinds()
            found = registry.command(name)
        return found


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
    ctx.obj = CliState(plan_path, progress)


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
    with Progress(*columns, console=stderr.console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def main() -> None:
    try:
        code = cli.main(prog_name="spark-backup", standalone_mode=False)
    except SparkBackupError as error:
        error_line(error)
        sys.exit(error.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        from spark_backup.__main__ import exit_interrupted

        exit_interrupted()
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    # Done: a Ctrl-C now would only cut the interpreter's exit short (and kill it by SIGINT).
    with suppress(ValueError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code if isinstance(code, int) else 0)
