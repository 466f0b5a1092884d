"""Asset checks. Names are constants (or a kind's class attribute) shared by specs and results.

- ``checksum`` (per partition, on every backup asset): re-read the newest copy of each part of
  the partition from its store, recompute sha256 and size and compare them with the manifest.
  No key is needed.
- ``freshness`` (per artifact): the newest committed copy must be at most ``max_age`` old. A
  schedule evaluates it (see schedules.py), so it fails even when nothing runs.
- the log's lag check (``wal_archive_lag`` for PostgreSQL, named by the kind): the log the
  system wrote must be in the store within the source's RPO; the lag is plotted as metadata,
  and a schedule runs it at the kind's cadence (every 5 minutes). A kind may bring more checks
  of its log, run with it (PostgreSQL: ``wal_receiver``, the streaming receiver's lag).
- ``secret_rotation`` (per source, on its system asset): every secret a backup of the source
  needs (its own, its store's, the plan's) was written within the rotation limit (182 days by
  default); a secret of unknown age fails unless the plan says ``unknown_age: warn``. A sealed
  or unreachable Vault fails it too. Metadata names references, versions and ages, never values.
- ``retention`` (per artifact): per part, how many of the last 7 days, 4 weeks and 12 months
  (the plan's policy) hold a copy retention keeps, fewer while the series is younger; a period
  without one warns (the freshness check is the one that fails for a missed backup).
- ``deletion_concept_review`` (per ``personal_data`` source, on its system asset): the
  deletion concept (``compliance.deletion_concept``) was reviewed within the last year.
- ``upload_lifecycle`` (per source on an S3 store, on its system asset): the bucket has an
  enabled lifecycle rule that aborts incomplete multipart uploads below the store's prefix, and
  none of spark-backup's incomplete uploads is older than that rule allows (a rule the server
  does not enforce fails); the stale ones ``prune`` will abort are listed.
- ``locked`` (per artifact, only on a store with Object Lock): every copy's data object and
  manifest are read back from the store: each must hold the store's lock mode with a date no
  earlier than its manifest recorded, and every copy retention still keeps must still be locked
  (the lock covers the tier's retention).
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
from spark_backup.defs.resources import SecretsResource, SparkBackupResource
from spark_backup.engine.cadence import utcnow
from spark_backup.engine.catalog import latest_per_part
from spark_backup.engine.settings import format_duration
from spark_backup.errors import SecretsUnavailableError
from spark_backup.plan import LoadedPlan, SourceSettings
from spark_backup.sources.base import Artifact, ContinuousLog, LogCheck

CHECKSUM_CHECK = "checksum"
FRESHNESS_CHECK = "freshness"
ROTATION_CHECK = "secret_rotation"
LOCKED_CHECK = "locked"
RETENTION_CHECK = "retention"
DELETION_REVIEW_CHECK = "deletion_concept_review"
UPLOAD_LIFECYCLE_CHECK = "upload_lifecycle"

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


def build_kind_log_check(check: LogCheck, asset_key: AssetKey) -> AssetChecksDefinition:
    """A check a kind brings for its log (``ContinuousLog.log_checks``), named by the kind."""

    @asset_check(asset=asset_key, name=check.name, description=check.description)
    def kind_log_check(spark_backup: SparkBackupResource) -> AssetCheckResult:
        outcome = check.evaluate(spark_backup.service, utcnow())
        return AssetCheckResult(
            check_name=check.name,
            passed=outcome.passed,
            severity=AssetCheckSeverity.ERROR,
            description=outcome.description,
            metadata=outcome.metadata,
        )

    return kind_log_check


def build_rotation_check(source: SourceSettings, asset_key: AssetKey) -> AssetChecksDefinition:
    @asset_check(
        asset=asset_key,
        name=ROTATION_CHECK,
        description="Fails when a secret a backup of this source needs is older than the "
        "rotation limit, has no known age, or cannot be read.",
    )
    def secret_rotation(secrets: SecretsResource) -> AssetCheckResult:
        try:
            statuses = secrets.status(source.name)
        except SecretsUnavailableError as exc:
            return AssetCheckResult(
                check_name=ROTATION_CHECK,
                passed=False,
                severity=AssetCheckSeverity.ERROR,
                description=str(exc),
            )
        limit = secrets.rotation_policy().max_age
        failed = [s for s in statuses if s.failed]
        warned = [s for s in statuses if s.finding and s.finding.verdict == "unknown"]
        metadata: dict[str, object] = {
            "rotation_limit_days": limit.days,
            "secrets": MetadataValue.md(
                "| field | reference | version | age (days) | rotation |\n"
                "| --- | --- | --- | --- | --- |\n"
                + "".join(
                    f"| {s.path} | `{s.ref}` | {_or_dash(s.finding and s.finding.secret.version)} "
                    f"| {_or_dash(s.finding and s.finding.age and s.finding.age.days)} "
                    f"| {s.finding.verdict if s.finding else 'unreadable'} |\n"
                    for s in statuses
                )
            ),
        }
        ages = [s.finding.age.days for s in statuses if s.finding and s.finding.age is not None]
        if ages:
            metadata["oldest_days"] = max(ages)
        if not statuses:
            description = f"{source.name} uses no secret references"
        elif failed or warned:
            description = "; ".join(
                s.error or (s.finding.reason if s.finding else "") for s in failed or warned
            )
        else:
            description = f"{len(statuses)} secrets, all within {limit.days} days"
        return AssetCheckResult(
            check_name=ROTATION_CHECK,
            passed=not failed,
            severity=AssetCheckSeverity.ERROR if failed else AssetCheckSeverity.WARN,
            description=description,
            metadata=metadata,
        )

    return secret_rotation


def _or_dash(value: object) -> str:
    return "-" if value is None or value is False else str(value)


def build_locked_check(
    source: SourceSettings, artifact: Artifact, asset_key: AssetKey
) -> AssetChecksDefinition:
    @asset_check(
        asset=asset_key,
        name=LOCKED_CHECK,
        description="Reads back every copy's Object Lock: the store's mode, a date no earlier "
        "than recorded, and still active for every copy retention keeps.",
    )
    def locked(spark_backup: SparkBackupResource) -> AssetCheckResult:
        found = spark_backup.service.worm_status(source.name, artifact.name)
        failing = [
            (status, kept)
            for status, kept in found
            if status.problems or (kept and not status.active)
        ]
        rows = "".join(
            f"| {s.copy_id} | {s.mode or '-'} | {s.retain_until or '-'} | "
            f"{'kept' if kept else 'expired'} | {'; '.join(s.problems) or ('ok' if s.active or not kept else 'lock ended')} |\n"
            for s, kept in found
        )
        return AssetCheckResult(
            check_name=LOCKED_CHECK,
            passed=bool(found) and not failing,
            severity=AssetCheckSeverity.ERROR,
            description=(
                f"no copy of {source.name} to read a lock from"
                if not found
                else "; ".join(
                    f"{s.copy_id}: {'; '.join(s.problems) or 'kept by retention but no longer locked'}"
                    for s, _ in failing
                )
                or f"{len(found)} copies locked ({found[0][0].expected_mode})"
            ),
            metadata={
                "copies": MetadataValue.md(
                    "| copy | mode | retain until | retention | lock |\n"
                    "| --- | --- | --- | --- | --- |\n" + rows
                ),
                "locked_copies": sum(1 for s, _ in found if s.active and not s.problems),
            },
        )

    return locked


def build_retention_check(
    source: SourceSettings, artifact: Artifact, asset_key: AssetKey
) -> AssetChecksDefinition:
    @asset_check(
        asset=asset_key,
        name=RETENTION_CHECK,
        description="Per tier, how many of the policy's daily, weekly and monthly periods hold "
        "a copy retention keeps.",
    )
    def retention(spark_backup: SparkBackupResource) -> AssetCheckResult:
        parts = spark_backup.service.retention_status(source.name, artifact.name)
        rows, short, metadata = [], [], {}
        for part, tiers in parts.items():
            for tier in tiers:
                label = f"{part} {tier.tier}".strip()
                rows.append(
                    f"| {part or '-'} | {tier.tier} | {tier.held} | {tier.expected} | "
                    f"{tier.policy} | {', '.join(tier.missing) or '-'} |\n"
                )
                if not part:
                    metadata[f"{tier.tier}_held"] = tier.held
                if tier.missing:
                    short.append(f"{label}: no copy for {', '.join(tier.missing)}")
        if not parts:
            description = f"no copy of {source.name} yet"
        else:
            description = "; ".join(short) or ", ".join(
                f"{t.tier} {t.held}/{t.policy}" for t in next(iter(parts.values()))
            )
        return AssetCheckResult(
            check_name=RETENTION_CHECK,
            passed=bool(parts) and not short,
            severity=AssetCheckSeverity.WARN,
            description=description,
            metadata={
                **metadata,
                "tiers": MetadataValue.md(
                    "| part | tier | held | of last periods | policy | periods without a copy |\n"
                    "| --- | --- | --- | --- | --- | --- |\n" + "".join(rows)
                ),
            },
        )

    return retention


def build_deletion_review_check(asset_key: AssetKey) -> AssetChecksDefinition:
    @asset_check(
        asset=asset_key,
        name=DELETION_REVIEW_CHECK,
        description="Fails when the deletion concept was last reviewed more than a year ago.",
    )
    def deletion_concept_review(spark_backup: SparkBackupResource) -> AssetCheckResult:
        status = spark_backup.service.deletion_concept_review()
        return AssetCheckResult(
            check_name=DELETION_REVIEW_CHECK,
            passed=status.ok,
            severity=AssetCheckSeverity.ERROR,
            description=status.description,
            metadata={"last_reviewed": str(status.reviewed or "")},
        )

    return deletion_concept_review


def build_upload_lifecycle_check(
    source: SourceSettings, asset_key: AssetKey
) -> AssetChecksDefinition:
    @asset_check(
        asset=asset_key,
        name=UPLOAD_LIFECYCLE_CHECK,
        description="The S3 store's lifecycle rule aborts incomplete multipart uploads, and no "
        "incomplete upload is older than it allows.",
    )
    def upload_lifecycle(spark_backup: SparkBackupResource) -> AssetCheckResult:
        status = spark_backup.service.upload_lifecycle(source.name)
        assert status is not None  # built only for sources on a store with multipart uploads
        return AssetCheckResult(
            check_name=UPLOAD_LIFECYCLE_CHECK,
            passed=status.ok,
            severity=AssetCheckSeverity.ERROR,
            description=status.description,
            metadata={
                "abort_after_days": _or_dash(status.abort_after_days),
                "overdue_uploads": MetadataValue.md(
                    "".join(f"- {key}\n" for key in status.overdue) or "none"
                ),
                "stale_uploads": MetadataValue.md(
                    "".join(f"- {key}\n" for key in status.stale) or "none"
                ),
            },
        )

    return upload_lifecycle
