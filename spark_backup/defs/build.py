"""Builds the Dagster definitions for one protection plan: an asset and two checks per artifact
of each source, an external asset with its lag check per PostgreSQL WAL archive, a backup job
and schedule per cadence, the freshness and WAL archive schedules, and the plan resource."""

from collections import defaultdict

from dagster import AssetKey, AssetsDefinition, AssetSpec, Definitions

from spark_backup.defs.assets import (
    backup_asset_key,
    build_backup_asset,
    build_wal_archive_spec,
)
from spark_backup.defs.checks import (
    build_checksum_check,
    build_freshness_check,
    build_wal_archive_lag_check,
)
from spark_backup.defs.resources import RESOURCE_KEY, SparkBackupResource
from spark_backup.defs.schedules import (
    build_backup_job,
    build_backup_schedule,
    build_freshness_schedule,
    build_wal_archive_schedule,
)
from spark_backup.plan import LoadedPlan, PostgresSource
from spark_backup.service import BackupService


def build_definitions(loaded: LoadedPlan) -> Definitions:
    service = BackupService(loaded)
    assets: list[AssetsDefinition | AssetSpec] = []
    checks, schedules, jobs = [], [], []
    keys_by_cadence: dict[str, list[AssetKey]] = defaultdict(list)
    wal_archives: list[AssetKey] = []
    for source in loaded.plan.sources:
        for artifact in service.artifacts(source):
            key = backup_asset_key(source.name, artifact)
            keys_by_cadence[artifact.cadence].append(key)
            assets.append(build_backup_asset(source, artifact, loaded))
            checks += [
                build_checksum_check(source, artifact, key),
                build_freshness_check(source, artifact, key),
            ]
        if isinstance(source, PostgresSource) and source.wal_archiving:
            spec = build_wal_archive_spec(source, loaded)
            assets.append(spec)
            checks.append(build_wal_archive_lag_check(source, spec.key))
            wal_archives.append(spec.key)
    for cadence, keys in keys_by_cadence.items():
        job = build_backup_job(cadence, keys)
        jobs.append(job)
        schedules.append(build_backup_schedule(job))
    schedules.append(
        build_freshness_schedule([k for keys in keys_by_cadence.values() for k in keys])
    )
    if wal_archives:
        schedules.append(build_wal_archive_schedule(wal_archives))
    return Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs,
        schedules=schedules,
        resources={RESOURCE_KEY: SparkBackupResource(plan_path=str(loaded.path))},
    )
