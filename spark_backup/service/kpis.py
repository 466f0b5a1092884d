"""KPIs per source artifact, from the stores alone: last success, backup duration, volume,
compression, and the last drill with its restore time beside the RTO. The same figures feed
``spark-backup monitor`` (table, JSON, Prometheus text) and the ``kpis/backups`` asset."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass

from spark_backup.engine.catalog import latest_per_part
from spark_backup.engine.pipeline import utcnow
from spark_backup.service.drills import DrillOperations


@dataclass(frozen=True)
class Kpi:
    source: str
    artifact: str
    copies: int
    last_success: str | None  # when the newest copy was committed
    age_hours: float | None
    duration_seconds: float | None  # the newest run: first start to last finish of its parts
    bytes: int | None  # plaintext of the newest run
    stored_bytes: int | None
    compression_ratio: float | None
    last_drill: str | None
    drill_passed: bool | None
    restore_seconds: float | None
    rto_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


class KpiOperations(DrillOperations):
    def kpis(self, now: dt.datetime | None = None) -> list[Kpi]:
        now = now or utcnow()
        rows = []
        for source in self.plan.sources:
            drills = self.drill_status(source.name)
            for artifact in self.artifacts(source):
                manifests = [ref.manifest for ref in self.copies(source.name, artifact.name)]
                newest = max(manifests, key=lambda m: (m.finished_at, m.id), default=None)
                run = latest_per_part(manifests, newest.partition) if newest else []
                drilled = [drills[m.id] for m in manifests if m.id in drills]
                last = max(drilled, key=lambda r: r.drilled_at, default=None)
                stored = sum(m.stored.bytes for m in run)
                rows.append(
                    Kpi(
                        source=source.name,
                        artifact=artifact.name,
                        copies=len(manifests),
                        last_success=newest.finished_at if newest else None,
                        age_hours=round((now - newest.finished).total_seconds() / 3600, 3)
                        if newest
                        else None,
                        duration_seconds=round(
                            (
                                max(m.finished for m in run) - min(m.started for m in run)
                            ).total_seconds(),
                            3,
                        )
                        if run
                        else None,
                        bytes=sum(m.plaintext.bytes for m in run) if run else None,
                        stored_bytes=stored if run else None,
                        compression_ratio=round(sum(m.plaintext.bytes for m in run) / stored, 3)
                        if stored
                        else None,
                        last_drill=last.drilled_at if last else None,
                        drill_passed=(last.passed and last.within_rto) if last else None,
                        restore_seconds=last.drill_seconds if last else None,
                        rto_seconds=source.rto.total_seconds(),
                    )
                )
        return rows


# Prometheus text exposition (node-exporter's textfile collector reads it).
_GAUGES = (
    ("last_success_timestamp_seconds", "When the newest copy was committed.", "last_success"),
    ("copy_age_hours", "Age of the newest copy.", "age_hours"),
    ("backup_duration_seconds", "Duration of the newest backup run.", "duration_seconds"),
    ("backup_bytes", "Plaintext bytes of the newest backup run.", "bytes"),
    (
        "backup_stored_bytes",
        "Stored (compressed, encrypted) bytes of the newest run.",
        "stored_bytes",
    ),
    ("compression_ratio", "Plaintext over stored bytes of the newest run.", "compression_ratio"),
    ("copies", "Committed copies in the store.", "copies"),
    ("last_drill_timestamp_seconds", "When the last restore drill finished.", "last_drill"),
    ("drill_passed", "1 if the last drill passed within the RTO.", "drill_passed"),
    ("restore_seconds", "Measured restore time of the last drill.", "restore_seconds"),
    ("rto_seconds", "The source's recovery time objective.", "rto_seconds"),
)


def prometheus_text(rows: list[Kpi]) -> str:
    lines = []
    for name, help_text, attribute in _GAUGES:
        metric = f"spark_backup_{name}"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge"]
        for row in rows:
            value = getattr(row, attribute)
            if value is None:
                continue
            if isinstance(value, str):
                value = dt.datetime.fromisoformat(value).timestamp()
            labels = f'source="{row.source}",artifact="{row.artifact}"'
            lines.append(f"{metric}{{{labels}}} {float(value)!r}")
    return "\n".join(lines) + "\n"
