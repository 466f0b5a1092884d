"""``kpis/backups``: the KPIs of every source (``service/kpis.py``) as metadata the UI plots
over time (one float per source artifact and figure), materialized hourly. It reads the stores
only, so it has no upstream assets.

The KPI history rides along: per source, the success rate, verified rate and the slowest
drill's restore time of the current day, ISO week and month as floats
(``<source>.<period>.<figure>``, plotted like the others), and the whole history (the service's
pandas DataFrame) as a table (``history``)."""

from typing import TYPE_CHECKING

from dagster import AssetKey, AssetsDefinition, MaterializeResult, MetadataValue, asset

from spark_backup.defs.resources import SparkBackupResource
from spark_backup.engine.cadence import utcnow
from spark_backup.plan import LoadedPlan
from spark_backup.service.kpis import period_key

if TYPE_CHECKING:
    import pandas

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
# Figures of the current day, week and month plotted per source, as
# ``<source>.<period>.<figure>``.
HISTORY_PLOTTED = ("success_rate", "verified_rate", "restore_seconds_max")


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
        import pandas  # loaded by this asset's step only, not by every code location start

        history = spark_backup.service.kpi_history_frame()
        now = utcnow()
        current = history[
            [
                key == period_key(period, now)
                for period, key in zip(history.period, history.key, strict=True)
            ]
        ]
        for row in current.itertuples(index=False):
            for figure in HISTORY_PLOTTED:
                value = getattr(row, figure)
                if pandas.notna(value):
                    metadata[f"{row.source}.{row.period}.{figure}"] = MetadataValue.float(
                        float(value)
                    )
        metadata["history"] = MetadataValue.md(history_markdown(history))
        return MaterializeResult(metadata=metadata)

    return backup_kpis


def history_markdown(history: "pandas.DataFrame") -> str:
    lines = [
        "| source | period | backups | failed runs | success rate | verified rate | drills "
        "| passed | restore s max | restore s mean | RTO s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    # Missing figures (NaN) print as "-", as None does on the command line.
    for r in history.astype(object).where(history.notna(), None).itertuples(index=False):
        lines.append(
            f"| {r.source} | {r.key} | {r.backups} | {r.failed_runs} | "
            f"{_percent(r.success_rate)} | {_percent(r.verified_rate)} | {r.drills} | "
            f"{r.drills_passed} | {_seconds(r.restore_seconds_max)} | "
            f"{_seconds(r.restore_seconds_mean)} | {r.rto_seconds:g} |"
        )
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


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
