"""The orchestration journal (``orchestration_journal/backups/``), the task overview CSV and
the Definition of Done: what a drill, a backup, a check failure or a ticket leaves for people
to read. No Dagster imports; the service writes it (``service/journal.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spark_backup.lazy import lazy_exports

if TYPE_CHECKING:
    from spark_backup.journal.documents import (
        JournalError,
        tick_definition_of_done,
        update_task_row,
    )
    from spark_backup.journal.journal import Journal
    from spark_backup.journal.settings import JournalSettings, TaskColumns

# The plan reads ``journal.settings``; the journal itself (and the pipeline it writes with)
# loads only where something is written, not for every command that reads a plan.
_HOMES = {
    "Journal": "spark_backup.journal.journal",
    "JournalError": "spark_backup.journal.documents",
    "JournalSettings": "spark_backup.journal.settings",
    "TaskColumns": "spark_backup.journal.settings",
    "tick_definition_of_done": "spark_backup.journal.documents",
    "update_task_row": "spark_backup.journal.documents",
}

__getattr__ = lazy_exports(__name__, _HOMES, globals())

__all__ = [
    "Journal",
    "JournalError",
    "JournalSettings",
    "TaskColumns",
    "tick_definition_of_done",
    "update_task_row",
]
