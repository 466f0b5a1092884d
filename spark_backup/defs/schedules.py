"""A backup job and schedule per cadence, and a schedule every 30 minutes for the freshness checks.

Backup jobs select the cadence's assets, which brings their ``checksum`` checks into the same
run: every new copy is re-read and compared right after it is written.
"""

from __future__ import annotations

from collections.abc import Sequence

from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetSelection,
    DefaultScheduleStatus,
    ScheduleDefinition,
    build_schedule_from_partitioned_job,
    define_asset_job,
)

from spark_backup.defs.checks import FRESHNESS_CHECK, WAL_ARCHIVE_LAG_CHECK

FRESHNESS_JOB = "freshness_checks"
FRESHNESS_CRON = "*/30 * * * *"
# The RPO is 15 minutes by default: the lag must be looked at well within that.
WAL_ARCHIVE_JOB = "wal_archive_checks"
WAL_ARCHIVE_CRON = "*/5 * * * *"
# Backups start shortly after the period begins (UTC), at a quiet hour.
BACKUP_HOUR = 1


def backup_job_name(cadence: str) -> str:
    return f"{cadence}_backups"


def build_backup_job(cadence: str, keys: Sequence[AssetKey]):
    return define_asset_job(
        backup_job_name(cadence),
        selection=AssetSelection.assets(*keys),
        description=f"Back up every {cadence} source and verify the new copies.",
        tags={"spark_backup/cadence": cadence},
    )


def build_backup_schedule(job) -> ScheduleDefinition:
    return build_schedule_from_partitioned_job(
        job,
        name=f"{job.name}_schedule",
        hour_of_day=BACKUP_HOUR,
        default_status=DefaultScheduleStatus.RUNNING,
    )


def build_freshness_schedule(keys: Sequence[AssetKey]) -> ScheduleDefinition:
    return _check_schedule(
        FRESHNESS_JOB,
        [AssetCheckKey(key, FRESHNESS_CHECK) for key in keys],
        FRESHNESS_CRON,
        "Is the newest copy of every source young enough?",
    )


def build_wal_archive_schedule(keys: Sequence[AssetKey]) -> ScheduleDefinition:
    return _check_schedule(
        WAL_ARCHIVE_JOB,
        [AssetCheckKey(key, WAL_ARCHIVE_LAG_CHECK) for key in keys],
        WAL_ARCHIVE_CRON,
        "Is every PostgreSQL WAL archive within its RPO?",
    )


def _check_schedule(
    job_name: str, checks: Sequence[AssetCheckKey], cron: str, description: str
) -> ScheduleDefinition:
    """A job that runs only the given checks, and a schedule that runs it whatever else runs."""
    job = define_asset_job(
        job_name, selection=AssetSelection.checks(*checks), description=description
    )
    return ScheduleDefinition(
        name=f"{job_name}_schedule",
        job=job,
        cron_schedule=cron,
        execution_timezone="UTC",
        default_status=DefaultScheduleStatus.RUNNING,
    )
