"""One partitioned asset per plan source: materializing a partition makes a new copy."""

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    MaterializeResult,
    MetadataValue,
    asset,
)

from spark_backup.defs.partitions import PARTITIONS_BY_CADENCE
from spark_backup.defs.resources import SparkBackupResource
from spark_backup.engine.manifest import Manifest
from spark_backup.plan import LoadedPlan, SourceConfig, format_duration

ASSET_PREFIX = "backups"
# Dagster pools limit concurrent steps across all runs: one per source, limit 1 (dagster.yaml),
# so two runs never back up the same source at once.
POOL_PREFIX = "spark_backup_source_"
KIND_LABELS = {"config_archive": "tar"}


def backup_asset_key(source_name: str) -> AssetKey:
    return AssetKey([ASSET_PREFIX, source_name])


def source_pool(source_name: str) -> str:
    return f"{POOL_PREFIX}{source_name}"


def build_backup_asset(source: SourceConfig, loaded: LoadedPlan) -> AssetsDefinition:
    plan = loaded.plan
    store = plan.store_for(source)
    retention = plan.retention_for(source)

    @asset(
        key=backup_asset_key(source.name),
        partitions_def=PARTITIONS_BY_CADENCE[source.cadence],
        group_name=source.kind,
        kinds={KIND_LABELS.get(source.kind, source.kind), "age", store.kind},
        owners=[source.owner],
        pool=source_pool(source.name),
        description=source.description or f"{source.cadence} {source.kind} backup of {source.name}",
        tags={"cadence": source.cadence},
        metadata={
            "rpo": format_duration(source.rpo),
            "rto": format_duration(source.rto),
            "max_age": format_duration(plan.max_age_for(source)),
            "store": store.name,
            "retention": f"{retention.daily} daily, {retention.weekly} weekly, {retention.monthly} monthly",
        },
    )
    def backup(
        context: AssetExecutionContext, spark_backup: SparkBackupResource
    ) -> MaterializeResult:
        manifest = spark_backup.service.backup(source.name, context.partition_key)
        context.log.info(f"committed copy {manifest.id} ({manifest.stored.bytes} bytes stored)")
        for warning in manifest.source_metadata.get("warnings", []):
            context.log.warning(f"{source.name}: {warning}")
        return MaterializeResult(metadata=copy_metadata(manifest, spark_backup))

    return backup


def copy_metadata(manifest: Manifest, spark_backup: SparkBackupResource) -> dict[str, object]:
    """What the UI shows and plots per partition: where the copy is, its checksums, volume, time."""
    store = spark_backup.service.store(manifest.store)
    metadata: dict[str, object] = {
        "copy_id": manifest.id,
        "uri": MetadataValue.url(store.object_uri(manifest.data_key)),
        "sha256": manifest.plaintext.sha256,
        "stored_sha256": manifest.stored.sha256,
        "bytes": MetadataValue.int(manifest.plaintext.bytes),
        "stored_bytes": MetadataValue.int(manifest.stored.bytes),
        "compression_ratio": MetadataValue.float(round(manifest.compression_ratio, 3)),
        "duration_seconds": MetadataValue.float(round(manifest.duration_seconds, 3)),
    }
    for name in ("files", "directories", "symlinks", "warning_count"):
        if name in manifest.source_metadata:
            metadata[name] = MetadataValue.int(manifest.source_metadata[name])
    if manifest.lock:
        metadata["locked_until"] = manifest.lock["retain_until"]
    return metadata
