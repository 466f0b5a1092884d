"""Builds the Dagster definitions for one protection plan: an asset, two checks per source, a
backup job and schedule per cadence, the freshness schedule, and the plan resource."""

from collections import defaultdict

from dagster import AssetKey, Definitions

from spark_backup.defs.assets import backup_asset_key, build_backup_asset
from spark_backup.defs.checks import build_checksum_check, build_freshness_check
from spark_backup.defs.resources import RESOURCE_KEY, SparkBackupResource
from spark_backup.defs.schedules import (
    build_backup_job,
    build_backup_schedule,
    build_freshness_schedule,
)
from spark_backup.plan import LoadedPlan


def build_definitions(loaded: LoadedPlan) -> Definitions:
    assets, checks, schedules, jobs = [], [], [], []
    keys_by_cadence: dict[str, list[AssetKey]] = defaultdict(list)
    for source in loaded.plan.sources:
        key = backup_asset_key(source.name)
        keys_by_cadence[source.cadence].append(key)
        assets.append(build_backup_asset(source, loaded))
        checks += [build_checksum_check(source, key), build_freshness_check(source, key)]
    for cadence, keys in keys_by_cadence.items():
        job = build_backup_job(cadence, keys)
        jobs.append(job)
        schedules.append(build_backup_schedule(job))
    freshness = build_freshness_schedule([k for keys in keys_by_cadence.values() for k in keys])
    schedules.append(freshness)
    return Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs,
        schedules=schedules,
        resources={RESOURCE_KEY: SparkBackupResource(plan_path=str(loaded.path))},
    )
