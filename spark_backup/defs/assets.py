"""One partitioned asset per artifact of a plan source (materializing a partition makes new
copies), and an external asset for each PostgreSQL WAL archive."""

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    AssetSpec,
    MaterializeResult,
    MetadataValue,
    asset,
)

from spark_backup.defs.partitions import PARTITIONS_BY_CADENCE
from spark_backup.defs.resources import SparkBackupResource
from spark_backup.engine.manifest import Manifest
from spark_backup.plan import (
    WAL_ARCHIVE_ASSET_SUFFIX,
    LoadedPlan,
    SourceConfig,
    format_duration,
)
from spark_backup.sources.artifacts import Artifact

ASSET_PREFIX = "backups"
# Dagster pools limit concurrent steps across all runs: one per source, limit 1 (dagster.yaml),
# so two runs never back up the same source at once.
POOL_PREFIX = "spark_backup_source_"
KIND_LABELS = {"config_archive": "tar"}


def backup_asset_key(source_name: str, artifact: Artifact | None = None) -> AssetKey:
    """``backups/<source>`` for a source's primary artifact, ``backups/<source>_<artifact>``
    for the others (a PostgreSQL source's base backups)."""
    if artifact is None or artifact.primary:
        return AssetKey([ASSET_PREFIX, source_name])
    return AssetKey([ASSET_PREFIX, f"{source_name}_{artifact.name}"])


def wal_archive_asset_key(source_name: str) -> AssetKey:
    return AssetKey([ASSET_PREFIX, f"{source_name}_{WAL_ARCHIVE_ASSET_SUFFIX}"])


def source_pool(source_name: str) -> str:
    return f"{POOL_PREFIX}{source_name}"


def build_backup_asset(
    source: SourceConfig, artifact: Artifact, loaded: LoadedPlan
) -> AssetsDefinition:
    plan = loaded.plan
    store = plan.store_for(source)
    retention = plan.retention_for(source)

    @asset(
        key=backup_asset_key(source.name, artifact),
        partitions_def=PARTITIONS_BY_CADENCE[artifact.cadence],
        group_name=source.kind,
        kinds={KIND_LABELS.get(source.kind, source.kind), "age", store.kind},
        owners=[source.owner],
        pool=source_pool(source.name),
        description=source.description or f"{artifact.description} of {source.name}",
        tags={"cadence": artifact.cadence, "artifact": artifact.name},
        metadata={
            "rpo": format_duration(source.rpo),
            "rto": format_duration(source.rto),
            "max_age": format_duration(artifact.max_age),
            "store": store.name,
            "retention": f"{retention.daily} daily, {retention.weekly} weekly, {retention.monthly} monthly",
        },
    )
    def backup(
        context: AssetExecutionContext, spark_backup: SparkBackupResource
    ) -> MaterializeResult:
        manifests = spark_backup.service.backup(
            source.name, context.partition_key, artifact=artifact.name
        )
        for manifest in manifests:
            context.log.info(
                f"committed copy {manifest.id} {manifest.part} ({manifest.stored.bytes} bytes stored)"
            )
            for warning in manifest.source_metadata.get("warnings", []):
                context.log.warning(f"{source.name}: {warning}")
        return MaterializeResult(metadata=copies_metadata(manifests, spark_backup))

    return backup


def build_wal_archive_spec(source: SourceConfig, loaded: LoadedPlan) -> AssetSpec:
    """The continuous WAL archive: written by the server's archive_command, not by a run, so
    it is an external asset; its ``wal_archive_lag`` check measures the RPO."""
    store = loaded.plan.store_for(source)
    return AssetSpec(
        key=wal_archive_asset_key(source.name),
        group_name=source.kind,
        kinds={"postgres", "age", store.kind},
        owners=[source.owner],
        description=f"WAL segments of {source.name}, archived by `spark-backup wal-push`",
        metadata={"rpo": format_duration(source.rpo), "store": store.name},
    )


def copies_metadata(
    manifests: list[Manifest], spark_backup: SparkBackupResource
) -> dict[str, object]:
    """What the UI shows and plots per partition: where the copies are, their checksums,
    volume and time. One copy is shown in full; several (one per database) are summed."""
    if len(manifests) == 1:
        return copy_metadata(manifests[0], spark_backup)
    total = sum(m.plaintext.bytes for m in manifests)
    stored = sum(m.stored.bytes for m in manifests)
    metadata: dict[str, object] = {
        "copies": MetadataValue.json(
            {m.part or m.id: {"copy_id": m.id, "sha256": m.plaintext.sha256} for m in manifests}
        ),
        "bytes": MetadataValue.int(total),
        "stored_bytes": MetadataValue.int(stored),
        "compression_ratio": MetadataValue.float(round(total / stored, 3) if stored else 0.0),
        "duration_seconds": MetadataValue.float(
            round(
                (
                    max(m.finished for m in manifests) - min(m.started for m in manifests)
                ).total_seconds(),
                3,
            )
        ),
    }
    rows = [m.source_metadata["rows"] for m in manifests if "rows" in m.source_metadata]
    if rows:
        metadata["rows"] = MetadataValue.int(sum(rows))
    return metadata


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
    for name in ("files", "directories", "symlinks", "warning_count", "rows", "tables"):
        if name in manifest.source_metadata:
            metadata[name] = MetadataValue.int(manifest.source_metadata[name])
    if manifest.lock:
        metadata["locked_until"] = manifest.lock["retain_until"]
    return metadata
