"""Asset checks. Names are constants (or a kind's class attribute) shared by specs and results.

- ``checksum`` (per partition, on every backup asset): re-read the newest copy of each part of
  the partition from its store, recompute sha256 and size and compare them with the manifest.
  No key is needed.
- ``freshness`` (per artifact): the newest committed copy must be at most ``max_age`` old. A
  schedule evaluates it (see schedules.py), so it fails even when nothing runs.
- the log's lag check (``wal_archive_lag`` for PostgreSQL, named by the kind): the log the
  system wrote must be in the store within the source's RPO; the lag is plotted as metadata,
  and a schedule runs it at the kind's cadence (every 5 minutes).
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

from spark_backup.defs.partitions import partitions_for
from spark_backup.defs.resources import SparkBackupResource
from spark_backup.engine.catalog import latest_per_part
from spark_backup.engine.pipeline import utcnow
from spark_backup.engine.settings import format_duration
from spark_backup.plan import LoadedPlan, SourceSettings
from spark_backup.sources.base import Artifact, ContinuousLog

CHECKSUM_CHECK = "checksum"
FRESHNESS_CHECK = "freshness"

# Partitioned asset checks are a Dagster preview feature; they are what lets the UI show, for
# every day, week and month, whether that partition's copy is intact. Tested in
# spark_backup_tests/test_definitions.py against the pinned Dagster release.
warnings.filterwarnings(
    "ignore", message=".*partitions_def on an AssetCheckSpec", category=PreviewWarning
)


def build_checksum_check(
    source: SourceSettings, artifact: Artifact, asset_key: AssetKey, loaded: LoadedPlan
) -> AssetChecksDefinition:
    @asset_check(
        asset=asset_key,
        name=CHECKSUM_CHECK,
        partitions_def=partitions_for(artifact.cadence, loaded.plan.defaults.partitions_start),
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
    source: SourceSettings, artifact: Artifact, asset_key: AssetKey
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


def build_log_lag_check(
    source: SourceSettings, kind: ContinuousLog, asset_key: AssetKey
) -> AssetChecksDefinition:
    check_name = kind.lag_check_name

    @asset_check(
        asset=asset_key,
        name=check_name,
        description="Fails when the log the system wrote is not in the store within the "
        "source's RPO.",
    )
    def log_lag(spark_backup: SparkBackupResource) -> AssetCheckResult:
        status = kind.lag(spark_backup.service, source, utcnow())
        rpo = format_duration(status.rpo)
        metadata: dict[str, object] = {
            "rpo_seconds": status.rpo.total_seconds(),
            "newest": status.newest or "",
            **status.details,
        }
        if status.lag is None:
            description = f"nothing of {source.name}'s {kind.log_name} is archived (RPO {rpo})"
        else:
            metadata["lag_seconds"] = MetadataValue.float(round(status.lag.total_seconds(), 1))
            description = f"archive lag {status.lag.total_seconds():.0f} s (RPO {rpo})"
        if status.problems:
            description = "; ".join(status.problems) + f" ({description})"
        if status.source_error:
            description += (
                f"; source not reachable, lag measured from the store: {status.source_error}"
            )
        return AssetCheckResult(
            check_name=check_name,
            passed=status.ok,
            severity=AssetCheckSeverity.ERROR,
            description=description,
            metadata=metadata,
        )

    return log_lag
