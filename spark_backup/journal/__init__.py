"""The orchestration journal (``orchestration_journal/backups/``), the task overview CSV and
the Definition of Done: what a drill, a backup, a check failure or a ticket leaves for people
to read. No Dagster imports; the service writes it (``service/journal.py``)."""

from spark_backup.journal.documents import (
    JournalError,
    tick_definition_of_done,
    update_task_row,
)
from spark_backup.journal.journal import Journal
from spark_backup.journal.settings import JournalSettings, TaskColumns

__all__ = [
    "Journal",
    "JournalError",
    "JournalSettings",
    "TaskColumns",
    "tick_definition_of_done",
    "update_task_row",
]
