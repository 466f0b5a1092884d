"""Telling people: tickets (outbox, webhook, Jira) and email to the security team for every
failure, deduplicated and queued when a backend is down. No Dagster imports: the sensors in
``defs/sensors.py`` and the command line both use ``TicketDesk``."""

from spark_backup.notify.desk import RUN_FAILED, Failure, Outcome, TicketDesk
from spark_backup.notify.settings import EmailSettings, Notifications, TicketSettings

__all__ = [
    "RUN_FAILED",
    "EmailSettings",
    "Failure",
    "Notifications",
    "Outcome",
    "TicketDesk",
    "TicketSettings",
]
