"""The journal side of every operation: backups, drills, failures and tickets appended to the
orchestration journal; after a passed drill, the task overview row and the Definition of Done
updated (``journal/``)."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from spark_backup.engine.manifest import Manifest
from spark_backup.engine.settings import format_duration
from spark_backup.journal import Journal, JournalError, tick_definition_of_done, update_task_row
from spark_backup.service.runtime import PlanRuntime

if TYPE_CHECKING:
    from spark_backup.service.drills import DrillReport


class JournalOperations(PlanRuntime):
    def journal(self) -> Journal:
        settings = self.plan.journal
        return Journal(settings, self.loaded.resolve(settings.dir))

    def journal_backup(self, manifest: Manifest) -> None:
        self.journal().append(
            "backup",
            source=manifest.source,
            partition=manifest.partition,
            part=manifest.part,
            copy_id=manifest.id,
            bytes=manifest.plaintext.bytes,
            stored_bytes=manifest.stored.bytes,
            seconds=round(manifest.duration_seconds, 3),
            store=manifest.store,
        )

    def journal_event(self, event: str, **fields: Any) -> None:
        self.journal().append(event, **fields)

    def journal_drill(self, report: DrillReport) -> tuple[list[str], list[str]]:
        """Append the drill, write its summary, and after a pass update the task overview and
        the Definition of Done; return what was written and what could not be (a malformed
        document is left unchanged and named)."""
        journal = self.journal()
        settings = self.plan.journal
        done, errors = [], []
        stamp = dt.datetime.fromisoformat(report.finished_at).astimezone(dt.UTC)
        name = f"drill-{report.source}-{stamp:%Y%m%dT%H%M%S}.{stamp.microsecond // 1000:03d}Z.md"
        summary = journal.write_summary(name, drill_markdown(report))
        entry = journal.append(
            "drill",
            source=report.source,
            artifact=report.artifact,
            partition=report.partition,
            passed=report.passed,
            within_rto=report.within_rto,
            restore_seconds=report.restore_seconds,
            rto_seconds=report.rto_seconds,
            copies=[s.copy_id for s in report.steps],
            summary=summary.name if summary else None,
        )
        done += [str(p) for p in (summary, entry) if p]
        if not settings.enabled or not (report.passed and report.within_rto):
            return done, errors
        evidence = str(summary.relative_to(self.loaded.base_dir)) if summary else report.source
        stamp_text = f"{stamp:%Y-%m-%dT%H:%M:%SZ}"
        if settings.tasks_csv:
            path = self.loaded.resolve(settings.tasks_csv)
            if path.exists():
                try:
                    action = update_task_row(
                        path,
                        settings.columns,
                        settings.task_id,
                        {
                            "status": settings.task_done_status,
                            "date": stamp_text,
                            "evidence": evidence,
                        },
                        settings.task_title,
                    )
                    done.append(f"{path}: row {settings.task_id} {action}")
                except (JournalError, OSError) as exc:
                    errors.append(str(exc))
        if settings.definition_of_done:
            path = self.loaded.resolve(settings.definition_of_done)
            if path.exists():
                try:
                    line = tick_definition_of_done(path, settings.dod_item, stamp_text)
                    done.append(f"{path}: {line.strip()}")
                except (JournalError, OSError) as exc:
                    errors.append(str(exc))
        return done, errors


def drill_markdown(report: DrillReport) -> str:
    rto = format_duration(dt.timedelta(seconds=report.rto_seconds))
    verdict = "passed" if report.passed and report.within_rto else "FAILED"
    lines = [
        f"# Restore drill of {report.source}: {verdict}",
        "",
        f"- artifact: {report.artifact}, partition {report.partition}",
        f"- started: {report.started_at}",
        f"- finished: {report.finished_at}",
        f"- restore time: {report.restore_seconds:.3f} s (RTO {rto}: "
        f"{'within' if report.within_rto else 'EXCEEDED'})",
        f"- staging: {report.staging} "
        f"({'removed' if report.torn_down else 'NOT removed: ' + str(report.teardown_error)})",
        "",
        "| copy | part | check | result | seconds | what it showed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for step in report.steps:
        lines.append(
            f"| {step.copy_id} | {step.part or '-'} | {step.check} | "
            f"{'pass' if step.passed else 'FAIL'} | {step.seconds:.3f} | "
            f"{markdown_cell(step.description)} |"
        )
    return "\n".join(lines) + "\n"


def markdown_cell(text: str) -> str:
    """``text`` as one cell of a Markdown table row."""
    return text.replace("|", "\\|").replace("\n", " ")
