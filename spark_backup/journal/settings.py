"""The plan's ``journal`` section: where the orchestration journal is written, and which task
overview row and Definition-of-Done item a passed drill updates. Paths are relative to the
plan file; the defaults are the names the recovery plan uses."""

from __future__ import annotations

from pydantic import Field

from spark_backup.engine.settings import SettingsModel


class TaskColumns(SettingsModel):
    """The task overview's column names (its header row)."""

    id: str = "ID"
    status: str = "Status"
    date: str = "Datum"
    evidence: str = "Nachweis"


class JournalSettings(SettingsModel):
    enabled: bool = True
    # One JSON-lines file per day, and a Markdown summary per drill.
    dir: str = "orchestration_journal/backups"
    # Commit each new journal file to the git repository that holds it.
    auto_commit: bool = False
    # The task overview CSV; a missing file is skipped. Its drill row is found by ``task_id``
    # in the ``columns.id`` column and created if missing.
    tasks_csv: str | None = "Agenten_Aufgaben_Uebersicht.csv"
    task_id: str = Field("restore-drill", min_length=1)
    task_title: str = "Monatlicher Restore-Test (isolierte Staging-Umgebung)"
    task_done_status: str = "erledigt"
    columns: TaskColumns = TaskColumns.default_instance()
    # The Definition of Done; a missing file is skipped. The checklist item whose text holds
    # ``dod_item`` is ticked with the drill's time.
    definition_of_done: str | None = "docs/DEFINITION_OF_DONE.md"
    dod_item: str = Field("Restore-Probe", min_length=1)
