"""Cadences: one registry shared by partitions, retention and schedules.

A cadence cuts time (UTC) into periods; a period's key is its start, formatted as Dagster's
time-window partitions format it, so a copy made from the CLI lands in the partition the UI
shows. Keys never depend on the plan: the plan's ``partitions_start`` only decides how far back
the UI lists partitions, so changing it never moves a key of an existing copy.

- ``15min``: ``2026-11-29-10:15``, the quarter hour (continuous-log slices);
- ``hourly``: ``2026-11-29-10:00``;
- ``daily``: ``2026-11-29``;
- ``weekly``: ``2026-11-23``, the Monday the ISO week starts on;
- ``monthly``: ``2026-11-01``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from spark_backup.errors import UsageError

TIMEZONE = "UTC"
DATE_FORMAT = "%Y-%m-%d"
# Dagster's own format for sub-daily time windows.
MINUTE_FORMAT = "%Y-%m-%d-%H:%M"
# Where partitions begin when the plan does not say: what every release before the setting used.
DEFAULT_PARTITIONS_START = dt.date(2026, 1, 1)
# Dagster's WeeklyPartitionsDefinition counts day_offset from Sunday: 1 is Monday.
WEEK_STARTS_ON = 1


@dataclass(frozen=True)
class Cadence:
    """How a cadence cuts time into periods, and how a period's key is written."""

    name: str
    key_format: str
    # The period's start for any moment (UTC, naive arithmetic on an aware datetime).
    start_of: Callable[[dt.datetime], dt.datetime]
    # Nominal length, for sizes and defaults (a month counts 31 days).
    length: dt.timedelta
    # Cron of the period starts, as Dagster's time-window partitions define them.
    cron: str
    # When the scheduled backup of a period runs, as minutes after the period starts: a quiet
    # hour for daily and longer periods, at once for slices of a continuous log.
    schedule_delay: dt.timedelta

    @property
    def sub_daily(self) -> bool:
        return self.length < dt.timedelta(days=1)

    def key_for(self, when: dt.datetime) -> str:
        """The key of the period that contains ``when``."""
        return self.start_of(when.astimezone(dt.UTC)).strftime(self.key_format)

    def start_of_key(self, key: str) -> dt.datetime:
        """The start of the period ``key`` names; ``UsageError`` if it names none."""
        try:
            start = dt.datetime.strptime(key, self.key_format).replace(tzinfo=dt.UTC)
        except ValueError:
            what, shape = (
                ("a date", "YYYY-MM-DD")
                if self.key_format == DATE_FORMAT
                else ("a time", "YYYY-MM-DD-HH:MM")
            )
            raise UsageError(f"partition {key!r} is not {what} (expected {shape})") from None
        if self.start_of(start) != start:
            raise UsageError(
                f"{key} does not start a {self.name} partition "
                f"(the one containing it is {self.key_for(start)})"
            )
        return start

    def first_start(self, partitions_start: dt.date) -> dt.datetime:
        """The start of the first partition: the period that contains ``partitions_start``."""
        return self.start_of(dt.datetime.combine(partitions_start, dt.time(), dt.UTC))

    def check_key(self, key: str, now: dt.datetime, partitions_start: dt.date) -> str:
        """``key`` if it names a period of this cadence that has begun and is not before the
        one containing ``partitions_start``; else ``UsageError``."""
        start = self.start_of_key(key)
        first = self.first_start(partitions_start).strftime(self.key_format)
        if start < self.first_start(partitions_start) or start > self.start_of(
            now.astimezone(dt.UTC)
        ):
            raise UsageError(
                f"partition {key} is outside {first} ... {self.key_for(now)} ({self.name})"
            )
        return key


def utcnow() -> dt.datetime:
    """Now, in UTC (what every timestamp of copies, drills and records is)."""
    return dt.datetime.now(dt.UTC)


def _quarter_hour(t: dt.datetime) -> dt.datetime:
    return t.replace(minute=t.minute - t.minute % 15, second=0, microsecond=0)


def _hour(t: dt.datetime) -> dt.datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def _day(t: dt.datetime) -> dt.datetime:
    return t.replace(hour=0, minute=0, second=0, microsecond=0)


def _week(t: dt.datetime) -> dt.datetime:
    return _day(t) - dt.timedelta(days=t.weekday())


def _month(t: dt.datetime) -> dt.datetime:
    return _day(t).replace(day=1)


CADENCES: dict[str, Cadence] = {
    c.name: c
    for c in (
        Cadence(
            "15min",
            MINUTE_FORMAT,
            _quarter_hour,
            dt.timedelta(minutes=15),
            "*/15 * * * *",
            dt.timedelta(0),
        ),
        Cadence(
            "hourly", MINUTE_FORMAT, _hour, dt.timedelta(hours=1), "0 * * * *", dt.timedelta(0)
        ),
        Cadence(
            "daily", DATE_FORMAT, _day, dt.timedelta(days=1), "0 0 * * *", dt.timedelta(hours=1)
        ),
        Cadence(
            "weekly", DATE_FORMAT, _week, dt.timedelta(weeks=1), "0 0 * * 1", dt.timedelta(hours=1)
        ),
        Cadence(
            "monthly",
            DATE_FORMAT,
            _month,
            dt.timedelta(days=31),
            "0 0 1 * *",
            dt.timedelta(hours=1),
        ),
    )
}
CADENCE_NAMES = tuple(CADENCES)


def cadence(name: str) -> Cadence:
    try:
        return CADENCES[name]
    except KeyError:
        raise UsageError(
            f"unknown cadence {name!r} (expected one of: {', '.join(CADENCE_NAMES)})"
        ) from None


def partition_key_for(cadence_name: str, when: dt.datetime) -> str:
    """The key of the ``cadence_name`` partition that contains ``when``."""
    return cadence(cadence_name).key_for(when)
