"""The monthly disaster drill: the newest copy of every ``critical`` source restored, the
service restarted, each step timed, the total against the plan's ``disaster_drill.rto``, and a
timestamped report (Markdown and JSON) in the orchestration journal.

Nothing here knows a kind. A source is restored with the capabilities its kind has:

- ``PointInTimeRecovery`` with a base copy: recovered to the newest point of its log into a
  fresh folder, verified and stopped (PostgreSQL's PITR);
- otherwise the restore drill of its newest partition (``DrillOperations.drill``): restored
  into staging and proved with the kind's semantic check, which for a configuration archive
  includes the Kubernetes and VPN drills its plan entry asks for.

The restart runs after the restore of ``restart.after`` (else after every restore): the plan's
``restart.command`` with its timeout (a command that hangs is killed with its process group and
fails the drill), or by default the restore drill of ``restart.service`` (for an LLM: the
tokenizer and adapter loaded and every tensor checked against its digest).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from spark_backup.engine.cadence import utcnow
from spark_backup.engine.settings import format_duration
from spark_backup.engine.staging import remove_tree
from spark_backup.errors import SparkBackupError, UsageError
from spark_backup.plan import SourceSettings
from spark_backup.service.drills import DrillOperations, make_staging
from spark_backup.service.journal import markdown_cell
from spark_backup.sources.base import PointInTimeRecovery, RecoveryTarget

RESTORE = "restore"
RECOVER = "recover_to_newest"
RESTART_COMMAND = "restart_command"
RESTART_CHECK = "restart_check"


@dataclass
class DisasterStep:
    name: str
    action: str
    source: str | None
    passed: bool
    seconds: float
    description: str
    # The copies the step restored (their ids).
    copies: list[str] = field(default_factory=list)
    started_at: str = ""
    # What the kind reported of a recovery (its report's public fields: times, row counts).
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class DisasterReport:
    started_at: str
    finished_at: str
    rto_seconds: float
    total_seconds: float
    steps: list[DisasterStep]
    journal: list[str] = field(default_factory=list)
    journal_errors: list[str] = field(default_factory=list)

    @property
    def within_rto(self) -> bool:
        return self.total_seconds <= self.rto_seconds

    @property
    def passed(self) -> bool:
        return bool(self.steps) and all(s.passed for s in self.steps) and self.within_rto

    def reasons(self) -> list[str]:
        """Why the drill failed (empty when it passed)."""
        found = [f"{s.name}: {s.description}" for s in self.steps if not s.passed]
        if not self.within_rto:
            rto = format_duration_seconds(self.rto_seconds)
            found.append(f"total {self.total_seconds:.3f} s exceeds the RTO of {rto}")
        return found

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "within_rto": self.within_rto,
            "passed": self.passed,
            "reasons": self.reasons(),
        }


def format_duration_seconds(seconds: float) -> str:
    return format_duration(dt.timedelta(seconds=seconds))


class DisasterOperations(DrillOperations):
    def critical_sources(self) -> list[SourceSettings]:
        return [source for source in self.plan.sources if source.critical]

    def disaster_drill(self, *, staging_root: str | Path | None = None) -> DisasterReport:
        """Restore every critical source and restart the service, timing each step; the report
        is journaled (``disaster-drill-<UTC time>.md`` and ``.json``)."""
        settings = self.plan.disaster_drill
        sources = self.critical_sources()
        if not sources:
            raise UsageError(
                "no source is marked critical: set 'critical: true' on the sources the disaster "
                "drill restores"
            )
        restart = settings.restart
        started = utcnow()
        clock = time.monotonic()
        steps: list[DisasterStep] = []
        restarted = False
        for source in sources:
            # The default restart restores its service's copy itself: not twice.
            if restart is None or restart.command is not None or restart.service != source.name:
                steps.append(self._restore_step(source, staging_root))
            if restart is not None and restart.after == source.name:
                steps.append(self._restart_step(staging_root))
                restarted = True
        if restart is not None and not restarted:
            steps.append(self._restart_step(staging_root))
        total = round(time.monotonic() - clock, 3)
        report = DisasterReport(
            started_at=started.isoformat(),
            finished_at=utcnow().isoformat(),
            rto_seconds=settings.rto.total_seconds(),
            total_seconds=total,
            steps=steps,
        )
        report.journal, report.journal_errors = self._journal_disaster(report)
        return report

    # --- steps ----------------------------------------------------------------------------------

    def _restore_step(
        self, source: SourceSettings, staging_root: str | Path | None
    ) -> DisasterStep:
        kind = self.kind_named(source.kind)
        started = utcnow().isoformat()
        clock = time.monotonic()
        if isinstance(kind, PointInTimeRecovery):
            try:
                window = kind.recovery_window(self, source)
            except SparkBackupError:
                window = None
            if window is not None and window.earliest is not None:
                return self._recover_step(kind, source, staging_root, started, clock)
        try:
            drill = self.drill(source.name, staging_root=staging_root)
        except SparkBackupError as exc:
            return self._step(f"restore {source.name}", RESTORE, source, False, clock, str(exc))
        failed = [f"{s.copy_id}: {s.description}" for s in drill.steps if not s.passed]
        if not drill.torn_down:
            failed.append(drill.teardown_error or "staging not removed")
        description = "; ".join(failed) or "; ".join(
            f"{s.part or s.copy_id}: {s.check}: {s.description}" for s in drill.steps
        )
        step = self._step(
            f"restore {source.name}", RESTORE, source, drill.passed, clock, description
        )
        step.copies = [s.copy_id for s in drill.steps]
        step.started_at = started
        return step

    def _recover_step(
        self,
        kind: PointInTimeRecovery,
        source: SourceSettings,
        staging_root: str | Path | None,
        started: str,
        clock: float,
    ) -> DisasterStep:
        name = f"recover {source.name} to the newest point"
        staging = make_staging(source.name, staging_root)
        # The recovered server runs as its own OS user, which must reach its data folder.
        os.chmod(staging, 0o755)
        try:
            result = kind.recover(self, source, RecoveryTarget(), staging / "pitr", stop_after=True)
            passed = bool(getattr(result, "ok", True))
            error = getattr(result, "error", None)
            base = getattr(result, "base_copy_id", None)
            reached = getattr(result, "recovered_to", None)
            description = error or f"recovered from {base} to {reached or 'the end of the log'}"
            details = asdict(result) if is_dataclass(result) else {}
        except SparkBackupError as exc:
            passed, description, base, details = False, str(exc), None, {}
        finally:
            try:
                remove_tree(staging)
            except OSError as exc:
                passed, description = False, f"staging {staging} not removed: {exc.strerror}"
        step = self._step(name, RECOVER, source, passed, clock, description)
        step.copies = [base] if base else []
        step.started_at = started
        step.details = details
        return step

    def _restart_step(self, staging_root: str | Path | None) -> DisasterStep:
        restart = self.plan.disaster_drill.restart
        assert restart is not None
        started = utcnow().isoformat()
        clock = time.monotonic()
        if restart.command is None:
            assert restart.service is not None
            step = self._restore_step(self.plan.source(restart.service), staging_root)
            step.name = f"restart {restart.service} (restored and checked)"
            step.action = RESTART_CHECK
            return step
        name = f"restart {restart.service or 'service'}"
        service = self.plan.source(restart.service) if restart.service else None
        passed, description = run_restart_command(
            restart.command, restart.timeout, self.loaded.base_dir
        )
        return self._step(name, RESTART_COMMAND, service, passed, clock, description, started)

    @staticmethod
    def _step(
        name: str,
        action: str,
        source: SourceSettings | None,
        passed: bool,
        clock: float,
        description: str,
        started: str = "",
    ) -> DisasterStep:
        return DisasterStep(
            name,
            action,
            source.name if source else None,
            passed,
            round(time.monotonic() - clock, 3),
            description,
            started_at=started,
        )

    # --- the report -----------------------------------------------------------------------------

    def _journal_disaster(self, report: DisasterReport) -> tuple[list[str], list[str]]:
        journal = self.journal()
        written: list[str] = []
        errors: list[str] = []
        stamp = utcnow()
        base = f"disaster-drill-{stamp:%Y%m%dT%H%M%S}.{stamp.microsecond // 1000:03d}Z"
        try:
            for path in (
                journal.write_summary(f"{base}.md", disaster_markdown(report)),
                journal.write_summary(
                    f"{base}.json", json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n"
                ),
                journal.append(
                    "disaster_drill",
                    passed=report.passed,
                    within_rto=report.within_rto,
                    total_seconds=report.total_seconds,
                    rto_seconds=report.rto_seconds,
                    steps=[{"name": s.name, "passed": s.passed} for s in report.steps],
                    summary=f"{base}.md",
                ),
            ):
                if path is not None:
                    written.append(str(path))
        except (SparkBackupError, OSError) as exc:
            errors.append(str(exc))
        return written, errors


def run_restart_command(command: list[str], timeout: dt.timedelta, cwd: Path) -> tuple[bool, str]:
    """Run the restart command without a shell; kill its whole process group (a script's
    children hang as well) when it outlives ``timeout``. Its output is never kept: it may print
    secrets."""
    what = f"restart command {command[0]!r}"
    try:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        return False, f"{what} could not start: {exc.strerror}"
    try:
        status = process.wait(timeout=timeout.total_seconds())
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return False, f"{what} timed out after {format_duration(timeout)} and was killed"
    if status != 0:
        return False, f"{what} failed with exit status {status}"
    return True, f"{what} succeeded"


def disaster_markdown(report: DisasterReport) -> str:
    rto = format_duration_seconds(report.rto_seconds)
    verdict = "passed" if report.passed else "FAILED"
    lines = [
        f"# Disaster drill: {verdict}",
        "",
        f"- started: {report.started_at}",
        f"- finished: {report.finished_at}",
        f"- total: {report.total_seconds:.3f} s (RTO {rto}: "
        f"{'within' if report.within_rto else 'EXCEEDED'})",
        "",
        "| step | source | copies | result | seconds | what it showed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for step in report.steps:
        lines.append(
            f"| {step.name} | {step.source or '-'} | {', '.join(step.copies) or '-'} | "
            f"{'pass' if step.passed else 'FAIL'} | {step.seconds:.3f} | "
            f"{markdown_cell(step.description)} |"
        )
    reasons = report.reasons()
    if reasons:
        lines += ["", "## Why it failed", "", *(f"- {reason}" for reason in reasons)]
    return "\n".join(lines) + "\n"
