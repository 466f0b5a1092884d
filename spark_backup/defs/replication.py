"""Replicas: ``replicas/<source>`` (and ``replicas/<source>_<artifact>``), one per backup asset
of a source with ``replicate_to``, partitioned like it and downstream of it, so lineage reads
system -> backups (the versions) -> replicas (the registry or second store). The cadence's
backup job materializes it right after the backups: a partition pushes its copies and every
earlier copy still unreplicated (a target that was down is retried by the next run), then
evaluates the ``replicated`` check in the same step: each target's replica of the partition's
copies, digest for digest. A failed push or check never deletes anything."""

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    MaterializeResult,
    MetadataValue,
    asset,
)

from spark_backup.defs.assets import backup_asset_key, source_pool
from spark_backup.defs.partitions import partitions_for
from spark_backup.defs.resources import SparkBackupResource
from spark_backup.plan import LoadedPlan, SourceSettings
from spark_backup.service import ReplicaOutcome
from spark_backup.sources.base import Artifact, SourceKind

REPLICA_PREFIX = "replicas"
REPLICATED_CHECK = "replicated"


def replica_asset_key(source_name: str, artifact: Artifact | None = None) -> AssetKey:
    return AssetKey([REPLICA_PREFIX, backup_asset_key(source_name, artifact).path[-1]])


def build_replica_asset(
    source: SourceSettings, artifact: Artifact, kind: SourceKind, loaded: LoadedPlan
) -> AssetsDefinition:
    key = replica_asset_key(source.name, artifact)
    partitions = partitions_for(artifact.cadence, loaded.plan.defaults.partitions_start)
    targets = [r for r in loaded.plan.replication if r.name in source.replicate_to]
    target_kinds = {"oci" if r.kind == "oci" else "replica" for r in targets}

    @asset(
        key=key,
        deps=[backup_asset_key(source.name, artifact)],
        partitions_def=partitions,
        group_name=source.kind,
        kinds={*kind.labels, *target_kinds},
        owners=[source.owner],
        pool=source_pool(source.name),
        description=f"replicas of {source.name}'s {artifact.name} copies on "
        f"{', '.join(source.replicate_to)}",
        tags={"cadence": artifact.cadence, "artifact": artifact.name},
        metadata={"targets": ", ".join(source.replicate_to)},
        check_specs=[
            AssetCheckSpec(
                REPLICATED_CHECK,
                asset=key,
                partitions_def=partitions,
                description="Every target holds the partition's copies with the versions' "
                "digests (a missing or different replica fails it).",
            )
        ],
    )
    def replicas(
        context: AssetExecutionContext, spark_backup: SparkBackupResource
    ) -> MaterializeResult:
        service = spark_backup.service
        pushed = service.replicate(source.name, artifact.name, context.partition_key)
        for outcome in pushed:
            if not outcome.replicated:
                context.log.warning(
                    f"{outcome.version} to {outcome.target}: {outcome.problem} (retried next run)"
                )
        checked = service.check_replicas(source.name, artifact.name, context.partition_key)
        return MaterializeResult(
            metadata=replica_metadata(pushed, checked),
            check_results=[replicated_result(checked)],
        )

    return replicas


def replica_metadata(
    pushed: list[ReplicaOutcome], checked: list[ReplicaOutcome]
) -> dict[str, object]:
    return {
        "replicated": MetadataValue.int(sum(o.replicated for o in checked)),
        "unreplicated": MetadataValue.int(sum(not o.replicated for o in checked)),
        "pushed": MetadataValue.int(sum(o.pushed and o.replicated for o in pushed)),
        "replicas": MetadataValue.json(
            [
                {
                    "version": o.version,
                    "target": o.target,
                    "replicated": o.replicated,
                    "location": o.location,
                    "problem": o.problem,
                }
                for o in checked
            ]
        ),
    }


def replicated_result(checked: list[ReplicaOutcome]) -> AssetCheckResult:
    failed = [o for o in checked if not o.replicated]
    return AssetCheckResult(
        check_name=REPLICATED_CHECK,
        # A partition without copies has no replica to miss (its backup's own checks say why).
        passed=not failed,
        severity=AssetCheckSeverity.ERROR,
        description=(
            f"{len(failed)} of {len(checked)} replicas missing or different; first: "
            f"{failed[0].version} on {failed[0].target}: {failed[0].problem}"
            if failed
            else f"{len(checked)} replicas hold the versions' digests"
            if checked
            else "no copy in this partition to replicate"
        ),
        metadata={
            "unreplicated": MetadataValue.json(
                [{"version": o.version, "target": o.target, "problem": o.problem} for o in failed]
            )
        },
    )
