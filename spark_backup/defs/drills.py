"""Restore drills: ``drills/<source>`` (and ``drills/<source>_<artifact>``), one per backup
asset, partitioned like it and downstream of it. Materializing a partition restores that
partition's newest copies into fresh staging, runs the kind's semantic check, times it against
the source's RTO, tears the staging down and records the drill beside each copy
(``service/drills.py``).

Two checks per drill asset, evaluated in the same step and shown per partition:

- ``restore_drill``: every copy restored and passed its kind's semantic check, and the staging
  was removed;
- ``rto``: the measured restore time is within the source's RTO.

The ``drill_new_copies`` sensor requests a drill for every new copy (sampled per source with
``drill_every``), and a monthly schedule per cadence drills the current partition of every drill asset (the restore
test the recovery plan asks for); one per cadence, because a job runs one partitioning.
"""

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    AssetSelection,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    MaterializeResult,
    MetadataValue,
    RunRequest,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    TimeWindowPartitionsDefinition,
    asset,
    define_asset_job,
    schedule,
    sensor,
)

from spark_backup.defs.assets import backup_asset_key, source_pool
from spark_backup.defs.partitions import partitions_for
from spark_backup.defs.resources import SparkBackupResource
from spark_backup.engine.cadence import partition_key_for
from spark_backup.engine.settings import format_duration
from spark_backup.plan import LoadedPlan, SourceSettings
from spark_backup.service.drills import DrillReport
from spark_backup.sources.base import Artifact, SemanticCheck, SourceKind

DRILL_PREFIX = "drills"
DRILL_CHECK = "restore_drill"
RTO_CHECK = "rto"
# The monthly restore test: 03:00 UTC on the 1st, two hours after the backups of every cadence
# have made the current partition's copies (their schedules run at 01:00).
DRILL_SCHEDULE = "monthly_restore_drills"
DRILL_CRON = "0 3 1 * *"
DRILL_SENSOR = "drill_new_copies"
DRILL_SENSOR_INTERVAL = 30


def drill_asset_key(source_name: str, artifact: Artifact | None = None) -> AssetKey:
    """``drills/<source>`` for the primary artifact, ``drills/<source>_<artifact>`` for others,
    beside the backup asset it tests."""
    return AssetKey([DRILL_PREFIX, backup_asset_key(source_name, artifact).path[-1]])


def build_drill_asset(
    source: SourceSettings, artifact: Artifact, kind: SourceKind, loaded: LoadedPlan
) -> AssetsDefinition:
    key = drill_asset_key(source.name, artifact)
    partitions = partitions_for(artifact.cadence, loaded.plan.defaults.partitions_start)
    proof = (
        f"the {kind.semantic_check_name} check"
        if isinstance(kind, SemanticCheck)
        else "a restore into a folder"
    )

    @asset(
        key=key,
        deps=[backup_asset_key(source.name, artifact)],
        partitions_def=partitions,
        group_name=source.kind,
        kinds={*kind.labels, "drill"},
        owners=[source.owner],
        pool=source_pool(source.name),
        description=f"restore drill of {source.name}'s {artifact.name} copies: staging, "
        f"{proof}, RTO {format_duration(source.rto)}",
        tags={"cadence": artifact.cadence, "artifact": artifact.name},
        metadata={"rto": format_duration(source.rto)},
        check_specs=[
            AssetCheckSpec(
                DRILL_CHECK,
                asset=key,
                partitions_def=partitions,
                description=f"The partition's copies restore into staging and pass {proof}.",
            ),
            AssetCheckSpec(
                RTO_CHECK,
                asset=key,
                partitions_def=partitions,
                description="The measured restore time is within the source's RTO.",
            ),
        ],
    )
    def drill(
        context: AssetExecutionContext, spark_backup: SparkBackupResource
    ) -> MaterializeResult:
        report = spark_backup.service.drill(source.name, artifact.name, context.partition_key)
        for step in report.steps:
            log = context.log.info if step.passed else context.log.error
            log(f"{step.copy_id}: {step.check} {step.seconds:.1f}s: {step.description}")
        for written in report.journal:
            context.log.info(f"journal: {written}")
        for error in report.journal_errors:
            context.log.warning(f"journal: {error}")
        return MaterializeResult(
            metadata=drill_metadata(report), check_results=drill_check_results(report)
        )

    return drill


def drill_metadata(report: DrillReport) -> dict[str, object]:
    """What the UI shows and plots per partition: the restore time beside the RTO."""
    return {
        "passed": report.passed,
        "restore_seconds": MetadataValue.float(report.restore_seconds),
        "rto_seconds": MetadataValue.float(report.rto_seconds),
        "rto_used_percent": MetadataValue.float(
            round(100 * report.restore_seconds / report.rto_seconds, 3)
        ),
        "copies": MetadataValue.json(
            [
                {
                    "copy_id": s.copy_id,
                    "part": s.part,
                    "check": s.check,
                    "passed": s.passed,
                    "seconds": s.seconds,
                    "description": s.description,
                }
                for s in report.steps
            ]
        ),
        "drilled_at": MetadataValue.timestamp(dt.datetime.fromisoformat(report.finished_at)),
        "staging_removed": report.torn_down,
        "journal": MetadataValue.json({"written": report.journal, "errors": report.journal_errors}),
    }


def drill_check_results(report: DrillReport) -> list[AssetCheckResult]:
    failed = [s for s in report.steps if not s.passed]
    restored = "; ".join(f"{s.copy_id}: {s.description}" for s in failed) or (
        f"{len(report.steps)} copies restored into staging and passed their checks"
    )
    if not report.torn_down:
        restored += f"; {report.teardown_error or 'staging not removed'}"
    rto = format_duration(dt.timedelta(seconds=report.rto_seconds))
    return [
        AssetCheckResult(
            check_name=DRILL_CHECK,
            passed=report.passed,
            severity=AssetCheckSeverity.ERROR,
            description=restored,
            metadata={"copy_ids": ", ".join(s.copy_id for s in report.steps)},
        ),
        AssetCheckResult(
            check_name=RTO_CHECK,
            passed=report.within_rto,
            severity=AssetCheckSeverity.ERROR,
            description=f"restore took {report.restore_seconds:.1f}s (RTO {rto})",
            metadata={
                "restore_seconds": MetadataValue.float(report.restore_seconds),
                "rto_seconds": MetadataValue.float(report.rto_seconds),
            },
        ),
    ]


def drill_job_name(cadence_name: str) -> str:
    return f"{cadence_name}_drills"


def drill_schedule_name(cadence_name: str) -> str:
    return f"{DRILL_SCHEDULE}_{cadence_name}"


def build_drill_job(cadence_name: str, keys: Sequence[AssetKey]):
    """The drill assets of one cadence (a job holds one partitioning)."""
    return define_asset_job(
        drill_job_name(cadence_name),
        selection=AssetSelection.assets(*keys),
        description=f"Drill every {cadence_name} artifact's copies of a partition.",
        tags={"spark_backup/cadence": cadence_name},
    )


def build_drill_schedule(cadence_name: str, job) -> ScheduleDefinition:
    """The monthly restore test of one cadence's drill assets: one run for the cadence's
    current partition; the run key (job, partition) makes a re-evaluated tick request nothing
    twice."""

    @schedule(
        name=drill_schedule_name(cadence_name),
        cron_schedule=DRILL_CRON,
        execution_timezone="UTC",
        job=job,
        default_status=DefaultScheduleStatus.RUNNING,
        description=f"The monthly restore test of every {cadence_name} artifact.",
    )
    def monthly_restore_drills(context: ScheduleEvaluationContext):
        partition = partition_key_for(cadence_name, context.scheduled_execution_time)
        return RunRequest(
            run_key=f"{job.name}:{partition}",
            partition_key=partition,
            tags={"spark_backup/drill": "monthly"},
        )

    return monthly_restore_drills


@dataclass(frozen=True)
class DrillTarget:
    """One drill asset, what it drills, and how often the sensor asks for it."""

    key: AssetKey
    source: str
    artifact: str
    job_name: str
    partitions: TimeWindowPartitionsDefinition
    every: int  # 0: never on a new copy; N: one new partition's copies in N


def build_drill_sensor(targets: Sequence[DrillTarget], jobs: Sequence) -> SensorDefinition:
    """Requests one drill for every new copy, whichever way it was made (a scheduled run, a
    backfill, the UI, the command line): the sensor reads the copies from the stores, not the
    materialization events, which a CLI backup does not write. Its cursor holds, per drill
    asset, the newest copy seen (finish time and id) and how many new partitions it saw (for
    sampling); the run key names the drill asset, the partition and its newest copy, so even a
    lost cursor never asks for the same drill twice. On its first look at an asset it drills
    only the newest partition, not the whole history."""

    @sensor(
        name=DRILL_SENSOR,
        minimum_interval_seconds=DRILL_SENSOR_INTERVAL,
        default_status=DefaultSensorStatus.RUNNING,
        jobs=list(jobs),
        description="Requests a restore drill for every new copy (sampled per source).",
    )
    def drill_new_copies(context: SensorEvaluationContext, spark_backup: SparkBackupResource):
        cursor = json.loads(context.cursor) if context.cursor else {}
        service = spark_backup.service
        requests: list[RunRequest] = []
        for target in targets:
            name = target.key.to_user_string()
            manifests = [r.manifest for r in service.copies(target.source, target.artifact)]
            state = cursor.get(name)
            if state is None:  # first look: only the newest partition is new
                newest = max(manifests, key=lambda m: (m.finished_at, m.id), default=None)
                before = [m for m in manifests if newest and m.partition != newest.partition]
                last = max(((m.finished_at, m.id) for m in before), default=("", ""))
                state = {"after": list(last), "seen": 0}
            after = tuple(state["after"])
            new = [m for m in manifests if (m.finished_at, m.id) > after]
            by_partition: dict[str, list] = {}
            for manifest in sorted(new, key=lambda m: (m.finished_at, m.id)):
                by_partition.setdefault(manifest.partition, []).append(manifest)
            for partition, copies in by_partition.items():
                state["seen"] += 1
                newest_id = copies[-1].id
                if not target.every or (state["seen"] - 1) % target.every:
                    continue
                if not target.partitions.has_partition_key(partition):
                    context.log.warning(f"{name}: {partition} is not a partition; not drilled")
                    continue
                requests.append(
                    RunRequest(
                        run_key=f"{name}:{partition}:{newest_id}",
                        job_name=target.job_name,
                        asset_selection=[target.key],
                        partition_key=partition,
                        tags={"spark_backup/drill": "new_copy", "spark_backup/copy": newest_id},
                    )
                )
            if new:
                last = max(new, key=lambda m: (m.finished_at, m.id))
                state["after"] = [last.finished_at, last.id]
            cursor[name] = state
        return SensorResult(
            run_requests=requests,
            cursor=json.dumps(cursor, sort_keys=True),
            skip_reason=None if requests else SkipReason("no new copy to drill"),
        )

    return drill_new_copies
