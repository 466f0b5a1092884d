"""The assets of one plan source, built from what its kind declares:

- ``systems/<source>``: the protected system, observed where its kind can do so cheaply (a
  tree's names, sizes and times; a database's WAL position), so the UI shows when it changed
  since its last copy;
- ``backups/<source>`` and ``backups/<source>_<artifact>``: one partitioned asset per artifact
  (materializing a partition makes new copies), downstream of the system;
- ``backups/<source>_<log>``: a continuous log (PostgreSQL's WAL archive), written by the
  system itself, not by a run, so an external asset with a lag check;
- ``recovery/<source>``: for kinds with point-in-time recovery, the window it can recover to,
  downstream of the base copies and the log.
"""

import warnings

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    AssetSpec,
    BetaWarning,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    ObserveResult,
    asset,
    multi_observable_source_asset,
)

from spark_backup.defs.partitions import partitions_for
from spark_backup.defs.resources import RESOURCE_KEY, SparkBackupResource
from spark_backup.engine.manifest import Manifest
from spark_backup.engine.settings import format_duration
from spark_backup.engine.text import printable
from spark_backup.plan import LoadedPlan, SourceSettings
from spark_backup.sources.base import (
    Artifact,
    Catalogued,
    ContinuousLog,
    Observable,
    PointInTimeRecovery,
    SourceKind,
)

# Observable source assets with specs (kinds, owners, deps) are a Dagster beta; tested against
# the pinned release in spark_backup_tests/test_definitions.py.
warnings.filterwarnings("ignore", message=".*multi_observable_source_asset", category=BetaWarning)

ASSET_PREFIX = "backups"
SYSTEM_PREFIX = "systems"
RECOVERY_PREFIX = "recovery"
# Dagster pools limit concurrent steps across all runs: one per source, limit 1 (dagster.yaml),
# so two runs never back up the same source at once.
POOL_PREFIX = "spark_backup_source_"


def backup_asset_key(source_name: str, artifact: Artifact | None = None) -> AssetKey:
    """``backups/<source>`` for a source's primary artifact, ``backups/<source>_<artifact>``
    for the others (a PostgreSQL source's base backups)."""
    suffix = artifact.asset_suffix if artifact else None
    return AssetKey([ASSET_PREFIX, f"{source_name}_{suffix}" if suffix else source_name])


def log_asset_key(source_name: str, kind: ContinuousLog) -> AssetKey:
    return AssetKey([ASSET_PREFIX, f"{source_name}_{kind.log_asset_suffix}"])


def system_asset_key(source_name: str) -> AssetKey:
    return AssetKey([SYSTEM_PREFIX, source_name])


def recovery_asset_key(source_name: str) -> AssetKey:
    return AssetKey([RECOVERY_PREFIX, source_name])


def source_pool(source_name: str) -> str:
    return f"{POOL_PREFIX}{source_name}"


def build_system_asset(
    source: SourceSettings, kind: SourceKind, loaded: LoadedPlan
) -> AssetsDefinition | AssetSpec:
    spec = AssetSpec(
        key=system_asset_key(source.name),
        group_name=source.kind,
        kinds=set(kind.labels),
        owners=[source.owner],
        description=source.description or f"the system {source.name} protects ({source.kind})",
    )
    if not isinstance(kind, Observable):
        return spec

    @multi_observable_source_asset(
        specs=[spec],
        name=f"observe_{source.name}",
        required_resource_keys={RESOURCE_KEY},
    )
    def observe(context):
        service = getattr(context.resources, RESOURCE_KEY).service
        observation = kind.observe(source, service.context(source))
        yield ObserveResult(
            asset_key=spec.key,
            data_version=DataVersion(observation.version),
            metadata=dict(observation.metadata),
        )

    return observe


def build_backup_asset(
    source: SourceSettings, artifact: Artifact, kind: SourceKind, loaded: LoadedPlan
) -> AssetsDefinition:
    plan = loaded.plan
    store = plan.store_for(source)
    retention = plan.retention_for(source)

    @asset(
        key=backup_asset_key(source.name, artifact),
        deps=[system_asset_key(source.name)],
        partitions_def=partitions_for(artifact.cadence, plan.defaults.partitions_start),
        group_name=source.kind,
        kinds={*kind.labels, "age", store.kind},
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
                f"committed copy {manifest.id} {printable(manifest.part)} "
                f"({manifest.stored.bytes} bytes stored)"
            )
            for warning in manifest.source_metadata.get("warnings", []):
                context.log.warning(f"{source.name}: {printable(warning)}")
        return MaterializeResult(metadata=copies_metadata(manifests, spark_backup))

    return backup


def build_log_spec(source: SourceSettings, kind: ContinuousLog, loaded: LoadedPlan) -> AssetSpec:
    """The continuous log: written by the system (PostgreSQL's archive_command), not by a run,
    so it is an external asset; its lag check measures the RPO."""
    assert isinstance(kind, SourceKind)
    store = loaded.plan.store_for(source)
    return AssetSpec(
        key=log_asset_key(source.name, kind),
        deps=[system_asset_key(source.name)],
        group_name=source.kind,
        kinds={*kind.labels, "age", store.kind},
        owners=[source.owner],
        description=f"{kind.log_name.upper()} of {source.name}, archived as it is written",
        metadata={"rpo": format_duration(source.rpo), "store": store.name},
    )


def build_recovery_asset(
    source: SourceSettings, kind: PointInTimeRecovery, upstream: list[AssetKey]
) -> AssetsDefinition:
    """The window the source can be recovered to, from its base copies and its log:
    materialized on a schedule, plotted per materialization."""
    assert isinstance(kind, SourceKind)

    @asset(
        key=recovery_asset_key(source.name),
        deps=upstream,
        group_name=source.kind,
        kinds=set(kind.labels),
        owners=[source.owner],
        description=f"the point-in-time recovery window of {source.name} (base copies + log)",
    )
    def recovery_window(spark_backup: SparkBackupResource) -> MaterializeResult:
        service = spark_backup.service
        window = kind.recovery_window(service, source)
        metadata: dict[str, object] = {
            key: MetadataValue.text(str(value)) for key, value in window.details.items()
        }
        if window.earliest and window.latest:
            metadata["earliest"] = MetadataValue.timestamp(window.earliest)
            metadata["latest"] = MetadataValue.timestamp(window.latest)
            metadata["window_hours"] = MetadataValue.float(
                round((window.latest - window.earliest).total_seconds() / 3600, 3)
            )
        return MaterializeResult(metadata=metadata)

    return recovery_window


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
    # A version of the blob layer: what it holds, and what it added to the store.
    for name in ("tensors", "chunks", "new_chunks", "added_bytes"):
        if isinstance(manifest.source_metadata.get(name), int):
            metadata[name] = MetadataValue.int(manifest.source_metadata[name])
    for name in ("version_digest", "label"):
        if isinstance(manifest.source_metadata.get(name), str):
            metadata[name] = manifest.source_metadata[name]
    if manifest.lock:
        metadata["locked_until"] = manifest.lock["retain_until"]
    metadata.update(catalogue_metadata(manifest, spark_backup))
    return metadata


def catalogue_metadata(manifest: Manifest, spark_backup: SparkBackupResource) -> dict[str, object]:
    """A catalogued kind's entry: whole as JSON, and its plain facts (dimension, vectors,
    metric, ...) one by one, so the UI can plot them per partition."""
    kind = spark_backup.service.kind_named(manifest.kind)
    entry = kind.catalogue(manifest) if isinstance(kind, Catalogued) else None
    if not entry:
        return {}
    metadata: dict[str, object] = {"catalogue": MetadataValue.json(entry)}
    for name, value in entry.items():
        if isinstance(value, bool):
            metadata[f"catalogue/{name}"] = MetadataValue.bool(value)
        elif isinstance(value, int):
            metadata[f"catalogue/{name}"] = MetadataValue.int(value)
        elif isinstance(value, str):
            metadata[f"catalogue/{name}"] = MetadataValue.text(value)
    return metadata
