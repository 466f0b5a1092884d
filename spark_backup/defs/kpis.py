"""``kpis/backups``: the KPIs of every source (``service/kpis.py``) as metadata the UI plots
over time (one float per source artifact and figure), materialized hourly. It reads the stores
only, so it has no upstream assets."""

from dagster import AssetKey, AssetsDefinition, MaterializeResult, MetadataValue, asset

from spark_backup.defs.resources import SparkBackupResource
from spark_backup.plan import LoadedPlan

KPI_ASSET = AssetKey(["kpis", "backups"])
KPI_GROUP = "kpis"
KPI_JOB = "backup_kpis"
KPI_CRON = "23 * * * *"
# Figures plotted per source artifact, as ``<source>.<artifact>.<figure>``.
PLOTTED = (
    "age_hours",
    "duration_seconds",
    "bytes",
    "stored_bytes",
    "compression_ratio",
    "restore_seconds",
    "rto_seconds",
)


def build_kpi_asset(loaded: LoadedPlan) -> AssetsDefinition:
    @asset(
        key=KPI_ASSET,
        group_name=KPI_GROUP,
        kinds={"prometheus"},
        owners=sorted({source.owner for source in loaded.plan.sources}),
        description="Last success, backup duration, volume, compression and the last drill's "
        "restore time beside the RTO, per source artifact (as `spark-backup monitor`).",
    )
    def backup_kpis(spark_backup: SparkBackupResource) -> MaterializeResult:
        rows = spark_backup.service.kpis()
        metadata: dict[str, object] = {}
        for row in rows:
            prefix = f"{row.source}.{row.artifact}"
            for figure in PLOTTED:
                value = getattr(row, figure)
                if value is not None:
                    metadata[f"{prefix}.{figure}"] = MetadataValue.float(float(value))
            if row.last_success:
                metadata[f"{prefix}.last_success"] = row.last_success
        metadata["table"] = MetadataValue.md(kpi_markdown(rows))
        return MaterializeResult(metadata=metadata)

    return backup_kpis


def kpi_markdown(rows) -> str:
    lines = [
        "| source | artifact | last success | age h | duration s | bytes | last drill | restore s | RTO s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.source} | {r.artifact} | {r.last_success or 'never'} | {r.age_hours} | "
            f"{r.duration_seconds} | {r.bytes} | {r.last_drill or '-'} | {r.restore_seconds} | "
            f"{r.rto_seconds} |"
        )
    return "\n".join(lines)
