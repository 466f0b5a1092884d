"""A backup job and schedule per cadence, and the check and observation schedules.

Backup jobs select the cadence's assets, which brings their ``checksum`` checks into the same
run: every new copy is re-read and compared right after it is written. A period's backup runs
``schedule_delay`` after it starts (engine/cadence.py): at 01:00 UTC for days, weeks and months.
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

from spark_backup.defs.checks import FRESHNESS_CHECK
from spark_backup.engine.cadence import cadence

FRESHNESS_JOB = "freshness_checks"
FRESHNESS_CRON = "*/30 * * * *"
OBSERVE_JOB = "observe_systems"
OBSERVE_CRON = "7 * * * *"
RECOVERY_JOB = "recovery_windows"
RECOVERY_CRON = "17 * * * *"
# Secrets age by days: once a day is enough to fail on the first day past the limit.
ROTATION_JOB = "secret_rotation_checks"
ROTATION_CRON = "23 6 * * *"
# Run retries (deploy/dagster.yaml retries a dead run once, a failed step only where a job asks):
# a backup run that failed is run again from its failed steps, so the sources that were copied are
# not copied twice; each retry makes new copies, never replaces one.
BACKUP_RUN_RETRIES = 2
RETRY_TAGS = {
    "dagster/max_retries": str(BACKUP_RUN_RETRIES),
    "dagster/retry_on_asset_or_op_failure": "true",
    "dagster/retry_strategy": "FROM_FAILURE",
}


def backup_job_name(cadence_name: str) -> str:
    return f"{cadence_name}_backups"


def log_checks_job_name(log_asset_suffix: str) -> str:
    return f"{log_asset_suffix}_checks"


def build_backup_job(cadence_name: str, keys: Sequence[AssetKey]):
    return define_asset_job(
        backup_job_name(cadence_name),
        selection=AssetSelection.assets(*keys),
        description=f"Back up every {cadence_name} artifact and verify the new copies.",
        tags={"spark_backup/cadence": cadence_name, **RETRY_TAGS},
    )


def build_backup_schedule(job, cadence_name: str) -> ScheduleDefinition:
    delay = cadence(cadence_name).schedule_delay
    hours, minutes = divmod(int(delay.total_seconds()) // 60, 60)
    timing = (
        {"hour_of_day": hours, "minute_of_hour": minutes}
        if not cadence(cadence_name).sub_daily
        else {}
    )
    return build_schedule_from_partitioned_job(
        job,
        name=f"{job.name}_schedule",
        default_status=DefaultScheduleStatus.RUNNING,
        **timing,
    )


def build_freshness_schedule(keys: Sequence[AssetKey]) -> ScheduleDefinition:
    return check_schedule(
        FRESHNESS_JOB,
        [AssetCheckKey(key, FRESHNESS_CHECK) for key in keys],
        FRESHNESS_CRON,
        "Is the newest copy of every artifact young enough?",
    )


def check_schedule(
    job_name: str, checks: Sequence[AssetCheckKey], cron: str, description: str
) -> ScheduleDefinition:
    """A job that runs only the given checks, and a schedule that runs it whatever else runs."""
    job = define_asset_job(
        job_name, selection=AssetSelection.checks(*checks), description=description
    )
    return _schedule(job, cron)


def asset_schedule(
    job_name: str, keys: Sequence[AssetKey], cron: str, description: str
) -> ScheduleDefinition:
    """A job of unpartitioned assets (observations, reports) and its schedule."""
    job = define_asset_job(
        job_name, selection=AssetSelection.assets(*keys), description=description
    )
    return _schedule(job, cron)


def _schedule(job, cron: str) -> ScheduleDefinition:
    return ScheduleDefinition(
        name=f"{job.name}_schedule",
        job=job,
        cron_schedule=cron,
        execution_timezone="UTC",
        default_status=DefaultScheduleStatus.RUNNING,
    )
