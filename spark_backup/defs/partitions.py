"""Time-window partitions per cadence, shared by assets, checks and jobs, made from the engine's
cadence registry (``engine/cadence.py``) so that the CLI and the UI agree on every key.

``end_offset=1`` makes the current period a partition: a copy belongs to the period in which it
was made. The first partition is the period holding the plan's ``defaults.partitions_start``; the definitions are
cached per cadence and start, so every asset, check and job of a cadence shares one object.
"""

from __future__ import annotations

import datetime as dt
import functools

from dagster import TimeWindowPartitionsDefinition

from spark_backup.engine.cadence import TIMEZONE, cadence


@functools.cache
def partitions_for(cadence_name: str, start: dt.date) -> TimeWindowPartitionsDefinition:
    chosen = cadence(cadence_name)
    return TimeWindowPartitionsDefinition(
        cron_schedule=chosen.cron,
        start=chosen.first_start(start).replace(tzinfo=None),
        fmt=chosen.key_format,
        timezone=TIMEZONE,
        end_offset=1,
    )
