"""Asset checks on every backup asset. Names are constants shared by specs and results.

- ``checksum`` (per partition): re-read the newest copy of the partition from its store,
  recompute sha256 and size and compare them with the manifest. No key is needed.
- ``freshness`` (per source): the newest committed copy must be at most the source's ``max_age``
  old. A schedule evaluates it (see schedules.py), so it fails even when nothing runs.
"""

import warnings

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    AssetKey,
    MetadataValue,
    PreviewWarning,
    asset_check,
)

from spark_backup.defs.partitions import PARTITIONS_BY_CADENCE
from spark_backup.defs.resources import SparkBackupResource
from spark_backup.engine.catalog import latest_copy
from spark_backup.plan import SourceConfig, format_duration

CHECKSUM_CHECK = "checksum"
FRESHNESS_CHECK = "freshness"

# Partitioned asset checks are a Dagster preview feature; they are what lets the UI show, for
# every day, week and month, whether that partition's copy is intact. Tested in
# spark_backup_tests/test_definitions.py against the pinned Dagster release.
warnings.filterwarnings(
    "ignore", message=".*partitions_def on an AssetCheckSpec", category=PreviewWarning
)


def build_checksum_check(source: SourceConfig, asset_key: AssetKey) -> AssetChecksDefinition:
    @asset_check(
        asset=asset_key,
        name=CHECKSUM_CHECK,
        partitions_def=PARTITIONS_BY_CADENCE[source.cadence],
        description="Re-reads the partition's newest copy and compares its sha256 and size with "
        "the manifest.",
    )
    def checksum(
        context: AssetCheckExecutionContext, spark_backup: SparkBackupResource
    ) -> AssetCheckResult:
        service = spark_backup.service
        partition = context.partition_key
        refs = {r.manifest.id: r for r in service.copies(source.name)}
        newest = latest_copy((r.manifest for r in refs.values()), partition)
        if newest is None:
            return AssetCheckResult(
                check_name=CHECKSUM_CHECK,
                passed=False,
                severity=AssetCheckSeverity.ERROR,
                description=f"no committed copy of {source.name} for partition {partition}",
            )
        outcome = service.verify(refs[newest.id])
        return AssetCheckResult(
            check_name=CHECKSUM_CHECK,
            passed=outcome.ok,
            severity=AssetCheckSeverity.ERROR,
            description=outcome.error or f"copy {newest.id} matches its manifest",
            metadata={
                "copy_id": newest.id,
                "stored_sha256": newest.stored.sha256,
                "bytes_read": outcome.bytes_read,
                "seconds": outcome.seconds,
            },
        )

    return checksum


def build_freshness_check(source: SourceConfig, asset_key: AssetKey) -> AssetChecksDefinition:
    @asset_check(
        asset=asset_key,
        name=FRESHNESS_CHECK,
        description="Fails when the newest committed copy is older than the source's max_age.",
    )
    def freshness(spark_backup: SparkBackupResource) -> AssetCheckResult:
        status = spark_backup.service.freshness(source.name)
        limit = format_duration(status.max_age)
        if status.newest is None or status.age is None:
            return AssetCheckResult(
                check_name=FRESHNESS_CHECK,
                passed=False,
                severity=AssetCheckSeverity.ERROR,
                description=f"no copy of {source.name} exists (allowed age {limit})",
                metadata={"max_age_hours": status.max_age.total_seconds() / 3600},
            )
        age_hours = status.age.total_seconds() / 3600
        return AssetCheckResult(
            check_name=FRESHNESS_CHECK,
            passed=status.ok,
            severity=AssetCheckSeverity.ERROR,
            description=f"newest copy {status.newest.id} is {age_hours:.1f} h old (allowed {limit})",
            metadata={
                "age_hours": MetadataValue.float(round(age_hours, 3)),
                "max_age_hours": status.max_age.total_seconds() / 3600,
                "newest_copy_id": status.newest.id,
                "newest_finished_at": status.newest.finished_at,
            },
        )

    return freshness
