"""Partition keys for the plan's cadences, computed the way the Dagster layer's partitions are
(daily: the day; weekly: the Monday the ISO week starts on; monthly: the first of the month), so
that a copy made from the CLI lands in the same partition the UI shows."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from spark_backup.errors import UsageError

PARTITION_DATE_FORMAT = "%Y-%m-%d"
# Fixed, not per plan: partition keys must not move when a plan changes. Periods are UTC days,
# ISO weeks and months.
PARTITIONS_START = dt.date(2026, 1, 1)
TIMEZONE = "UTC"
# Dagster's WeeklyPartitionsDefinition counts day_offset from Sunday: 1 is Monday.
WEEK_STARTS_ON = 1


def partition_key_for(cadence: str, when: dt.datetime) -> str:
    """The key of the partition (period) that contains ``when``."""
    day = when.astimezone(ZoneInfo(TIMEZONE)).date()
    if cadence == "daily":
        start = day
    elif cadence == "weekly":
        start = day - dt.timedelta(days=day.weekday())
    elif cadence == "monthly":
        start = day.replace(day=1)
    else:
        raise ValueError(f"unknown cadence {cadence!r}")
    return start.strftime(PARTITION_DATE_FORMAT)


def check_partition_key(cadence: str, key: str, now: dt.datetime) -> str:
    """``key`` if it names a partition of ``cadence`` that has begun, else ``UsageError``."""
    try:
        start = dt.datetime.strptime(key, PARTITION_DATE_FORMAT).date()
    except ValueError:
        raise UsageError(f"partition {key!r} is not a date (expected YYYY-MM-DD)") from None
    example = partition_key_for(cadence, now)
    if partition_key_for(cadence, dt.datetime.combine(start, dt.time(), ZoneInfo(TIMEZONE))) != key:
        raise UsageError(
            f"{key} does not start a {cadence} partition (the current one is {example})"
        )
    if start < PARTITIONS_START or key > example:
        raise UsageError(
            f"partition {key} is outside {PARTITIONS_START.isoformat()} ... {example} ({cadence})"
        )
    return key
