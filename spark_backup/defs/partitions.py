"""One partitions definition per cadence, shared by assets, checks and jobs.

``end_offset=1`` makes the current day, week or month a partition: a copy belongs to the period
in which it was made, the same rule the CLI follows (``engine.partitions.partition_key_for``).
"""

from __future__ import annotations

from dagster import (
    DailyPartitionsDefinition,
    MonthlyPartitionsDefinition,
    TimeWindowPartitionsDefinition,
    WeeklyPartitionsDefinition,
)

from spark_backup.engine.partitions import PARTITIONS_START, TIMEZONE, WEEK_STARTS_ON

_START = PARTITIONS_START.isoformat()

DAILY_PARTITIONS = DailyPartitionsDefinition(start_date=_START, timezone=TIMEZONE, end_offset=1)
WEEKLY_PARTITIONS = WeeklyPartitionsDefinition(
    start_date=_START, timezone=TIMEZONE, day_offset=WEEK_STARTS_ON, end_offset=1
)
MONTHLY_PARTITIONS = MonthlyPartitionsDefinition(start_date=_START, timezone=TIMEZONE, end_offset=1)

PARTITIONS_BY_CADENCE: dict[str, TimeWindowPartitionsDefinition] = {
    "daily": DAILY_PARTITIONS,
    "weekly": WEEKLY_PARTITIONS,
    "monthly": MONTHLY_PARTITIONS,
}
