"""``drills/disaster``: the monthly disaster drill (``service/disaster.py``), one unpartitioned
asset downstream of every critical source's backup asset, with its job and a monthly schedule.

Two checks, evaluated in the same step:

- ``disaster_drill``: every critical source restored and the service restarted;
- ``disaster_rto``: the total time is within the plan's ``disaster_drill.rto``.
"""

import datetime as dt

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    MaterializeResult,
    MetadataValue,
    ScheduleDefinition,
    asset,
)

from spark_backup.defs.assets import backup_asset_key
from spark_backup.defs.drills import DRILL_PREFIX
from spark_backup.defs.resources import SparkBackupResource
from spark_backup.defs.schedules import asset_schedule
from spark_backup.engine.settings import format_duration
from spark_backup.plan import LoadedPlan
from spark_backup.service.disaster import DisasterReport

DISASTER_ASSET = AssetKey([DRILL_PREFIX, "disaster"])
DISASTER_GROUP = "drills"
DISASTER_CHECK = "disaster_drill"
DISASTER_RTO_CHECK = "disaster_rto"
DISASTER_JOB = "disaster_drill"
# 04:00 UTC on the 1st: after the monthly restore drills (03:00), which follow the backups.
DISASTER_CRON = "0 4 1 * *"


def build_disaster_asset(loaded: LoadedPlan) -> AssetsDefinition | None:
    """None when no source is critical (there is nothing for the drill to restore)."""
    critical = [source for source in loaded.plan.sources if source.critical]
    if not critical:
        return None
    rto = format_duration(loaded.plan.disaster_drill.rto)

    @asset(
        key=DISASTER_ASSET,
        deps=[backup_asset_key(source.name) for source in critical],
        group_name=DISASTER_GROUP,
        kinds={"drill"},
        owners=sorted({source.owner for source in critical}),
        description=f"monthly disaster drill: the newest copy of every critical source "
        f"({', '.join(s.name for s in critical)}) restored, the service restarted, RTO {rto}",
        metadata={"rto": rto},
        check_specs=[
            AssetCheckSpec(
                DISASTER_CHECK,
                asset=DISASTER_ASSET,
                description="Every critical source restored and the service restarted.",
            ),
            AssetCheckSpec(
                DISASTER_RTO_CHECK,
                asset=DISASTER_ASSET,
                description="The whole drill took no longer than the plan's RTO.",
            ),
        ],
    )
    def disaster_drill(
        context: AssetExecutionContext, spark_backup: SparkBackupResource
    ) -> MaterializeResult:
        report = spark_backup.service.disaster_drill()
        for step in report.steps:
            log = context.log.info if step.passed else context.log.error
            log(f"{step.name}: {step.seconds:.1f}s: {step.description}")
        for error in report.journal_errors:
            context.log.warning(f"journal: {error}")
        return MaterializeResult(
            metadata=disaster_metadata(report), check_results=disaster_check_results(report)
        )

    return disaster_drill


def disaster_metadata(report: DisasterReport) -> dict[str, object]:
    return {
        "passed": report.passed,
        "total_seconds": MetadataValue.float(report.total_seconds),
        "rto_seconds": MetadataValue.float(report.rto_seconds),
        "steps": MetadataValue.json(
            [
                {
                    "name": s.name,
                    "source": s.source,
                    "copies": s.copies,
                    "passed": s.passed,
                    "seconds": s.seconds,
                    "description": s.description,
                }
                for s in report.steps
            ]
        ),
        "drilled_at": MetadataValue.timestamp(dt.datetime.fromisoformat(report.finished_at)),
        "journal": MetadataValue.json({"written": report.journal, "errors": report.journal_errors}),
    }


def disaster_check_results(report: DisasterReport) -> list[AssetCheckResult]:
    failed = [f"{s.name}: {s.description}" for s in report.steps if not s.passed]
    rto = format_duration(dt.timedelta(seconds=report.rto_seconds))
    return [
        AssetCheckResult(
            check_name=DISASTER_CHECK,
            passed=bool(report.steps) and not failed,
            severity=AssetCheckSeverity.ERROR,
            description="; ".join(failed) or f"{len(report.steps)} steps passed",
        ),
        AssetCheckResult(
            check_name=DISASTER_RTO_CHECK,
            passed=report.within_rto,
            severity=AssetCheckSeverity.ERROR,
            description=f"the drill took {report.total_seconds:.1f}s (RTO {rto})",
            metadata={
                "total_seconds": MetadataValue.float(report.total_seconds),
                "rto_seconds": MetadataValue.float(report.rto_seconds),
            },
        ),
    ]


def build_disaster_schedule() -> ScheduleDefinition:
    return asset_schedule(
        DISASTER_JOB,
        [DISASTER_ASSET],
        DISASTER_CRON,
        "The monthly disaster drill: every critical source restored, the service restarted.",
    )
