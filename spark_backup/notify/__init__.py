"""Telling people: tickets (outbox, webhook, Jira) and email to the security team for every
failure, deduplicated and queued when a backend is down. No Dagster imports: the sensors in
``defs/sensors.py`` and the command line both use ``TicketDesk``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spark_backup.lazy import lazy_exports

if TYPE_CHECKING:
    from spark_backup.notify.desk import RUN_FAILED, Failure, Outcome, TicketDesk
    from spark_backup.notify.settings import EmailSettings, Notifications, TicketSettings

# The plan reads ``notify.settings``; the desk (and the engine it uses) loads only where
# something is sent, not for every command that reads a plan.
_HOMES = {
    "RUN_FAILED": "spark_backup.notify.desk",
    "EmailSettings": "spark_backup.notify.settings",
    "Failure": "spark_backup.notify.desk",
    "Notifications": "spark_backup.notify.settings",
    "Outcome": "spark_backup.notify.desk",
    "TicketDesk": "spark_backup.notify.desk",
    "TicketSettings": "spark_backup.notify.settings",
}

__getattr__ = lazy_exports(__name__, _HOMES, globals())


__all__ = [
    "RUN_FAILED",
    "EmailSettings",
    "Failure",
    "Notifications",
    "Outcome",
    "TicketDesk",
    "TicketSettings",
]
