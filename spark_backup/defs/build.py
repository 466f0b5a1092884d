"""Builds the Dagster definitions for one protection plan by asking each source's kind what it
has: the system, an asset and two checks per artifact and its restore drill, the continuous log
with its lag check, the recovery window; a backup job and schedule per cadence; the check,
observation, recovery and monthly drill schedules; and the resources (``defs/resources.py``)."""

from collections import defaultdict
from collections.abc import Mapping

from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetsDefinition,
    AssetSpec,
    Definitions,
)
from dagster_aws.s3 import S3Resource

from spark_backup.defs.alerts import build_alerts_sensor
from spark_backup.defs.assets import (
    backup_asset_key,
    build_backup_asset,
    build_log_spec,
    build_recovery_asset,
    build_system_asset,
    system_asset_key,
)
from spark_backup.defs.checks import (
    DELETION_REVIEW_CHECK,
    ROTATION_CHECK,
    UPLOAD_LIFECYCLE_CHECK,
    build_checksum_check,
    build_deletion_review_check,
    build_freshness_check,
    build_kind_log_check,
    build_locked_check,
    build_log_lag_check,
    build_retention_check,
    build_rotation_check,
    build_upload_lifecycle_check,
)
from spark_backup.defs.disaster import build_disaster_asset, build_disaster_schedule
from spark_backup.defs.drills import (
    DrillTarget,
    build_drill_asset,
    build_drill_job,
    build_drill_schedule,
    build_drill_sensor,
    drill_asset_key,
    drill_job_name,
)
from spark_backup.defs.executor import asset_count_executor
from spark_backup.defs.kpis import KPI_ASSET, KPI_CRON, KPI_JOB, build_kpi_asset
from spark_backup.defs.partitions import partitions_for
from spark_backup.defs.replication import build_replica_asset, replica_asset_key
from spark_backup.defs.resources import plan_resources
from spark_backup.defs.schedules import (
    OBSERVE_CRON,
    OBSERVE_JOB,
    RECOVERY_CRON,
    RECOVERY_JOB,
    ROTATION_CRON,
    ROTATION_JOB,
    asset_schedule,
    build_backup_job,
    build_backup_schedule,
    build_freshness_schedule,
    check_schedule,
    log_checks_job_name,
)
from spark_backup.defs.sensors import build_check_failure_sensor, build_run_failure_sensor
from spark_backup.plan import LoadedPlan
from spark_backup.service import BackupService
from spark_backup.sources.base import ContinuousLog, Observable, PointInTimeRecovery


def build_definitions(
    loaded: LoadedPlan, platform_s3: Mapping[str, S3Resource] | None = None
) -> Definitions:
    """``platform_s3``: the platform's own S3Resource per store name (default: those named by
    ``$SPARK_BACKUP_S3_RESOURCES``), merged into each S3 store's resource."""
    service = BackupService(loaded)
    resources = plan_resources(loaded, platform_s3)
    assets: list[AssetsDefinition | AssetSpec] = []
    checks, schedules, jobs = [], [], []
    keys_by_cadence: dict[str, list[AssetKey]] = defaultdict(list)
    # Replica assets run in their cadence's backup job, right after the backups they copy.
    replicas_by_cadence: dict[str, list[AssetKey]] = defaultdict(list)
    # Lag checks by (log asset suffix, cron): one job and schedule each.
    log_checks: dict[tuple[str, str], list[AssetCheckKey]] = defaultdict(list)
    observed: list[AssetKey] = []
    recoveries: list[AssetKey] = []
    drills_by_cadence: dict[str, list[AssetKey]] = defaultdict(list)
    drill_targets: list[DrillTarget] = []
    # Which source each asset belongs to, for the failure sensors' tickets.
    sources_by_asset: dict[AssetKey, str] = {}
    rotation_checks: list[AssetCheckKey] = []
    for source in loaded.plan.sources:
        first = len(assets)
        kind = service.kind_of(source)
        system = build_system_asset(source, kind, loaded)
        assets.append(system)
        checks.append(build_rotation_check(source, system_asset_key(source.name)))
        rotation_checks.append(AssetCheckKey(system_asset_key(source.name), ROTATION_CHECK))
        if source.personal_data:
            checks.append(build_deletion_review_check(system_asset_key(source.name)))
            rotation_checks.append(
                AssetCheckKey(system_asset_key(source.name), DELETION_REVIEW_CHECK)
            )
        # Only S3 stores leave incomplete multipart uploads behind.
        if loaded.plan.store_for(source).kind == "s3":
            checks.append(build_upload_lifecycle_check(source, system_asset_key(source.name)))
            rotation_checks.append(
                AssetCheckKey(system_asset_key(source.name), UPLOAD_LIFECYCLE_CHECK)
            )
        if isinstance(kind, Observable):
            observed.append(system_asset_key(source.name))
        artifact_keys = {}
        for artifact in service.artifacts(source):
            key = backup_asset_key(source.name, artifact)
            artifact_keys[artifact.name] = key
            keys_by_cadence[artifact.cadence].append(key)
            assets.append(build_backup_asset(source, artifact, kind, loaded))
            assets.append(build_drill_asset(source, artifact, kind, loaded))
            if source.replicate_to:
                assets.append(build_replica_asset(source, artifact, kind, loaded))
                replicas_by_cadence[artifact.cadence].append(
                    replica_asset_key(source.name, artifact)
                )
            drill_key = drill_asset_key(source.name, artifact)
            drills_by_cadence[artifact.cadence].append(drill_key)
            drill_targets.append(
                DrillTarget(
                    drill_key,
                    source.name,
                    artifact.name,
                    drill_job_name(artifact.cadence),
                    partitions_for(artifact.cadence, loaded.plan.defaults.partitions_start),
                    source.drill_every,
                )
            )
            checks += [
                build_checksum_check(source, artifact, key, loaded),
                build_freshness_check(source, artifact, key),
                build_retention_check(source, artifact, key),
            ]
            # Only a store with Object Lock (a WORM store) has locks to read back.
            if getattr(loaded.plan.store_for(source), "object_lock", None):
                checks.append(build_locked_check(source, artifact, key))
        if isinstance(kind, ContinuousLog) and kind.log_enabled(source):
            if kind.log_artifact is None:  # pushed by the system: an external asset
                spec = build_log_spec(source, kind, loaded)
                assets.append(spec)
                log_key = spec.key
            else:  # read by the kind's own runs: the log artifact's asset
                log_key = artifact_keys[kind.log_artifact]
            checks.append(build_log_lag_check(source, kind, log_key))
            log_checks[(kind.log_asset_suffix, kind.lag_check_cron)].append(
                AssetCheckKey(log_key, kind.lag_check_name)
            )
            for log_check in kind.log_checks(source):
                checks.append(build_kind_log_check(log_check, log_key))
                log_checks[(kind.log_asset_suffix, kind.lag_check_cron)].append(
                    AssetCheckKey(log_key, log_check.name)
                )
            if isinstance(kind, PointInTimeRecovery) and kind.base_artifact in artifact_keys:
                recovery = build_recovery_asset(
                    source, kind, [artifact_keys[kind.base_artifact], log_key]
                )
                assets.append(recovery)
                recoveries.append(recovery.key)
        for item in assets[first:]:
            item_keys = item.keys if isinstance(item, AssetsDefinition) else {item.key}
            sources_by_asset.update(dict.fromkeys(item_keys, source.name))
    for cadence_name, keys in keys_by_cadence.items():
        job = build_backup_job(cadence_name, [*keys, *replicas_by_cadence[cadence_name]])
        jobs.append(job)
        schedules.append(build_backup_schedule(job, cadence_name))
    schedules.append(
        build_freshness_schedule([k for keys in keys_by_cadence.values() for k in keys])
    )
    for (check_name, cron), keys in log_checks.items():
        schedules.append(
            check_schedule(
                log_checks_job_name(check_name),
                keys,
                cron,
                f"Is every log within its RPO ({check_name})?",
            )
        )
    schedules.append(
        check_schedule(
            ROTATION_JOB,
            rotation_checks,
            ROTATION_CRON,
            "Daily compliance: is every secret within its rotation limit, the deletion "
            "concept reviewed within the year, and every S3 store's lifecycle rule aborting "
            "incomplete uploads?",
        )
    )
    if observed:
        schedules.append(
            asset_schedule(OBSERVE_JOB, observed, OBSERVE_CRON, "Observe every protected system.")
        )
    if recoveries:
        schedules.append(
            asset_schedule(
                RECOVERY_JOB,
                recoveries,
                RECOVERY_CRON,
                "Measure every point-in-time recovery window.",
            )
        )
    assets.append(build_kpi_asset(loaded))
    schedules.append(
        asset_schedule(KPI_JOB, [KPI_ASSET], KPI_CRON, "Measure the KPIs of every source.")
    )
    disaster = build_disaster_asset(loaded)
    if disaster is not None:
        assets.append(disaster)
        schedules.append(build_disaster_schedule())
    drill_jobs = []
    for cadence_name, keys in drills_by_cadence.items():
        job = build_drill_job(cadence_name, keys)
        drill_jobs.append(job)
        schedules.append(build_drill_schedule(cadence_name, job))
    return Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs,
        schedules=schedules,
        sensors=[
            build_drill_sensor(drill_targets, drill_jobs),
            build_alerts_sensor(drill_targets, drill_jobs),
            build_run_failure_sensor(sources_by_asset),
            build_check_failure_sensor(
                sources_by_asset,
                [
                    *(key for check in checks for key in check.check_keys),
                    *(
                        key
                        for item in assets
                        if isinstance(item, AssetsDefinition)
                        for key in item.check_keys
                    ),
                ],
            ),
        ],
        resources=resources,
        executor=asset_count_executor,
    )
