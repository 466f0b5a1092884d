"""Asset checks on every backup asset. Names are constants shared by specs and results.

- ``checksum`` (per partition): re-read the newest copy of the partition from its store,
  recompute sha256 and size and compare them with the manifest. No key is needed.
- ``freshness`` (per artifact): the newest committed copy must be at most ``max_age`` old. A
  schedule evaluates it (see schedules.py), so it fails even when nothing runs.
- ``wal_archive_lag`` (per PostgreSQL WAL archive): the WAL the server wrote must be archived
  within the source's RPO; the lag is plotted as metadata. A schedule runs it every 5 minutes.
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
from spark_backup.engine.catalog import latest_per_part
from spark_backup.plan import SourceConfig, format_duration
from spark_backup.sources.artifacts import Artifact

CHECKSUM_CHECK = "checksum"
FRESHNESS_CHECK = "freshness"
WAL_ARCHIVE_LAG_CHECK = "wal_archive_lag"

# Partitioned asset checks are a Dagster preview feature; they are what lets the UI show, for
# every day, week and month, whether that partition's copy is intact. Tested in
# spark_backup_tests/test_definitions.py against the pinned Dagster release.
warnings.filterwarnings(
    "ignore", message=".*partitions_def on an AssetCheckSpec", category=PreviewWarning
)


def build_checksum_check(
    source: SourceConfig, artifact: Artifact, asset_key: AssetKey
) -> AssetChecksDefinition:
    @asset_check(
        asset=asset_key,
        name=CHECKSUM_CHECK,
        partitions_def=PARTITIONS_BY_CADENCE[artifact.cadence],
        description="Re-reads the partition's newest copies and compares their sha256 and size "
        "with the manifests.",
    )
    def checksum(
        context: AssetCheckExecutionContext, spark_backup: SparkBackupResource
    ) -> AssetCheckResult:
        service = spark_backup.service
        partition = context.partition_key
        refs = {ref.manifest.id: ref for ref in service.copies(source.name, artifact.name)}
        newest = [
            refs[m.id] for m in latest_per_part((r.manifest for r in refs.values()), partition)
        ]
        if not newest:
            return AssetCheckResult(
                check_name=CHECKSUM_CHECK,
                passed=False,
                severity=AssetCheckSeverity.ERROR,
                description=f"no committed copy of {source.name} for partition {partition}",
            )
        outcomes = [service.verify(ref) for ref in newest]
        failed = [o for o in outcomes if not o.ok]
        return AssetCheckResult(
            check_name=CHECKSUM_CHECK,
            passed=not failed,
            severity=AssetCheckSeverity.ERROR,
            description="; ".join(o.error or "" for o in failed)
            or (
                f"{len(outcomes)} copies match their manifests"
                if len(outcomes) > 1
                else f"copy {outcomes[0].copy_id} matches its manifest"
            ),
            metadata={
                "copy_ids": ", ".join(o.copy_id for o in outcomes),
                "stored_sha256": ", ".join(r.manifest.stored.sha256 for r in newest),
                "bytes_read": sum(o.bytes_read for o in outcomes),
                "seconds": round(sum(o.seconds for o in outcomes), 3),
            },
        )

    return checksum


def build_freshness_check(
    source: SourceConfig, artifact: Artifact, asset_key: AssetKey
) -> AssetChecksDefinition:
    @asset_check(
        asset=asset_key,
        name=FRESHNESS_CHECK,
        description="Fails when the newest committed copy is older than the artifact's max_age.",
    )
    def freshness(spark_backup: SparkBackupResource) -> AssetCheckResult:
        status = spark_backup.service.freshness(source.name, artifact.name)
        limit = format_duration(status.max_age)
        if status.newest is None or status.age is None or status.missing_parts:
            missing = f" ({', '.join(status.missing_parts)})" if status.newest else ""
            return AssetCheckResult(
                check_name=FRESHNESS_CHECK,
                passed=False,
                severity=AssetCheckSeverity.ERROR,
                description=f"no copy of {source.name}{missing} exists (allowed age {limit})",
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


def build_wal_archive_lag_check(source: SourceConfig, asset_key: AssetKey) -> AssetChecksDefinition:
    @asset_check(
        asset=asset_key,
        name=WAL_ARCHIVE_LAG_CHECK,
        description="Fails when WAL the server wrote is not archived within the source's RPO.",
    )
    def wal_archive_lag(spark_backup: SparkBackupResource) -> AssetCheckResult:
        status = spark_backup.service.wal_archive_status(source.name)
        rpo = format_duration(status.rpo)
        metadata: dict[str, object] = {
            "rpo_seconds": status.rpo.total_seconds(),
            "newest_segment": status.newest.name if status.newest else "",
        }
        if status.server:
            metadata["server_segment"] = status.server.current_segment
            metadata["archiver_failed_count"] = status.server.failed_count
        if status.lag is None:
            description = f"no WAL of {source.name} is archived (RPO {rpo})"
        else:
            metadata["lag_seconds"] = MetadataValue.float(round(status.lag.total_seconds(), 1))
            description = f"archive lag {status.lag.total_seconds():.0f} s (RPO {rpo})"
        if status.server_error:
            description += (
                f"; server not reachable, lag measured from the store: {status.server_error}"
            )
        return AssetCheckResult(
            check_name=WAL_ARCHIVE_LAG_CHECK,
            passed=status.ok,
            severity=AssetCheckSeverity.ERROR,
            description=description,
            metadata=metadata,
        )

    return wal_archive_lag
