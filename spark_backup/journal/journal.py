"""The orchestration journal: every backup, check failure, ticket and drill appended under
``orchestration_journal/backups/`` (the plan's ``journal.dir``):

    YYYY-MM-DD.jsonl                  one JSON object per line, per UTC day, append-only
    drill-<source>-<UTC time>.md      a human-readable summary of each drill

Entries hold public facts only (names, ids, times, figures, verdicts), never a secret. With
``auto_commit`` each new or appended file is committed to the git repository around it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import subprocess
from pathlib import Path
from typing import Any

from spark_backup.engine.cadence import utcnow
from spark_backup.journal.documents import JournalError
from spark_backup.journal.settings import JournalSettings


class Journal:
    def __init__(self, settings: JournalSettings, directory: Path):
        self.settings = settings
        self.directory = directory

    def day_file(self, when: dt.datetime) -> Path:
        return self.directory / f"{when.astimezone(dt.UTC):%Y-%m-%d}.jsonl"

    def append(self, event: str, **fields: Any) -> Path | None:
        """Append one entry; ``None`` when the journal is off."""
        if not self.settings.enabled:
            return None
        now = utcnow()
        entry = {"at": now.isoformat(), "event": event, **fields}
        path = self.day_file(now)
        self.directory.mkdir(parents=True, exist_ok=True)
        line = json.dumps(entry, sort_keys=True, default=str) + "\n"
        with open(path, "a", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # one whole line per writer
            handle.write(line)
        self._commit(path, f"journal: {event} {fields.get('source', '')}".strip())
        return path

    def write_summary(self, name: str, text: str) -> Path | None:
        """A new Markdown file; never one that exists."""
        if not self.settings.enabled:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / name
        with open(path, "x", encoding="utf-8") as handle:
            handle.write(text)
        self._commit(path, f"journal: {name}")
        return path

    def entries(self, when: dt.datetime | None = None) -> list[dict[str, Any]]:
        path = self.day_file(when or utcnow())
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    def _commit(self, path: Path, message: str) -> None:
        if not self.settings.auto_commit:
            return
        git = ["git", "-C", str(path.parent)]
        for command in (["add", "--", path.name], ["commit", "-q", "-m", message, "--", path.name]):
            result = subprocess.run([*git, *command], capture_output=True, text=True, check=False)
            if result.returncode != 0:
                reason = (result.stderr.strip().splitlines() or ["no message"])[-1]
                raise JournalError(f"{path}: auto_commit: git {command[0]} failed: {reason}")
