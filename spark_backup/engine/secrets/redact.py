"""The redactor: every secret value this process resolved, replaced wherever text leaves it.

The first line of defence is that no code puts a value into a message, a manifest, metadata or a
log. This is the second: the resolver registers each value it hands out, and errors
(``SparkBackupError``), log records (through the record factory, so every logger and handler in
the process is covered, Dagster's included) and the CLI's output pass through ``redact``.

Imports nothing of spark-backup: ``spark_backup.errors`` uses it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

MASK = "[redacted]"
# Shorter values would mask ordinary words and digits everywhere; a secret that short is not
# one worth the name (the rotation check's report says which reference it is, never its value).
MIN_REDACTED_LENGTH = 4


class Redactor:
    """A set of secret values and the one function that masks them in text."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()

    def add(self, value: str) -> None:
        with self._lock:
            for part in {value, value.strip(), *value.strip().splitlines()}:
                part = part.strip()
                if len(part) >= MIN_REDACTED_LENGTH:
                    self._values.add(part)

    def redact(self, text: str) -> str:
        # Longest first: a value that contains another is masked whole.
        for value in sorted(self._values, key=len, reverse=True):
            if value in text:
                text = text.replace(value, MASK)
        return text

    def redact_any(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, tuple):
            return tuple(self.redact_any(v) for v in value)
        if isinstance(value, list):
            return [self.redact_any(v) for v in value]
        if isinstance(value, dict):
            return {k: self.redact_any(v) for k, v in value.items()}
        return value

    def __bool__(self) -> bool:
        return bool(self._values)

    def install_log_filter(self) -> None:
        """Mask values in every log record made in this process from now on (idempotent)."""
        global _installed
        with self._lock:
            if _installed:
                return
            _installed = True
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if self._values:
                record.msg = self.redact_any(record.msg)
                if record.args:
                    record.args = self.redact_any(record.args)
            return record

        logging.setLogRecordFactory(factory)


_installed = False

REDACTOR = Redactor()
"""The process's one redactor: the resolver adds to it, errors and logs read it."""
