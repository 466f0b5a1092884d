"""KPIs per source artifact, from the stores alone: last success, backup duration, volume,
compression, and the last drill with its restore time beside the RTO. The same figures feed
``spark-backup monitor`` (table, JSON, Prometheus text) and the ``kpis/backups`` asset.

The KPI history (``kpi_history``) groups the same facts per source and per UTC day, ISO week
and month (plain Python: pandas is not a dependency):

- ``success_rate``: backups that committed a copy over those attempted; a failed backup run is
  known from the orchestration journal's ``failure`` entries (check ``run``), so without a
  journal every attempt seen is a success;
- ``verified_rate``: of the copies committed in the period, those whose newest restore drill
  passed within the RTO;
- per drill finished in the period: its restore time (``drill_seconds``) beside the RTO, as
  ``drills``, ``drills_passed``, ``restore_seconds_max`` and ``restore_seconds_mean``.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

from spark_backup.engine.cadence import utcnow
from spark_backup.engine.catalog import latest_per_part
from spark_backup.notify.desk import RUN_FAILED
from spark_backup.service.drills import DrillOperations

if TYPE_CHECKING:
    import pandas


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


PERIODS = ("day", "week", "month")


def period_key(period: str, when: dt.datetime) -> str:
    """``2026-11-29``, ``2026-W48`` (ISO week) or ``2026-11``, in UTC."""
    when = when.astimezone(dt.UTC)
    if period == "day":
        return f"{when:%Y-%m-%d}"
    if period == "week":
        year, week, _ = when.isocalendar()
        return f"{year}-W{week:02d}"
    return f"{when:%Y-%m}"


@dataclass(frozen=True)
class KpiPeriod:
    source: str
    period: str  # day, week or month
    key: str  # period_key
    backups: int  # copies committed in the period
    failed_runs: int  # failed backup runs the journal recorded
    success_rate: float | None
    verified: int  # copies of the period whose newest drill passed within the RTO
    verified_rate: float | None
    drills: int  # drills finished in the period (each copy's newest)
    drills_passed: int
    restore_seconds_max: float | None
    restore_seconds_mean: float | None
    rto_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


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

    def kpi_history(self, periods: tuple[str, ...] = PERIODS) -> list[KpiPeriod]:
        """Per source and period (newest first within each source and period kind), from the
        stores and the journal; a period without a copy, a failure or a drill is left out."""
        failures = self._journal_failed_runs()
        rows: list[KpiPeriod] = []
        for source in self.plan.sources:
            drills = self.drill_status(source.name)
            manifests = [ref.manifest for ref in self.copies(source.name)]
            for period in periods:
                buckets: dict[str, dict[str, list]] = {}

                def bucket(key: str, buckets=buckets) -> dict[str, list]:
                    return buckets.setdefault(key, {"copies": [], "failed": [], "drills": []})

                for manifest in manifests:
                    bucket(period_key(period, manifest.finished))["copies"].append(manifest)
                for record in drills.values():
                    bucket(period_key(period, record.drilled))["drills"].append(record)
                for at in failures.get(source.name, []):
                    bucket(period_key(period, at))["failed"].append(at)
                for key in sorted(buckets, reverse=True):
                    found = buckets[key]
                    copies, failed, drilled = found["copies"], found["failed"], found["drills"]
                    verified = sum(
                        1
                        for m in copies
                        if m.id in drills and drills[m.id].passed and drills[m.id].within_rto
                    )
                    seconds = [r.drill_seconds for r in drilled]
                    rows.append(
                        KpiPeriod(
                            source=source.name,
                            period=period,
                            key=key,
                            backups=len(copies),
                            failed_runs=len(failed),
                            success_rate=_rate(len(copies), len(copies) + len(failed)),
                            verified=verified,
                            verified_rate=_rate(verified, len(copies)),
                            drills=len(drilled),
                            drills_passed=sum(1 for r in drilled if r.passed and r.within_rto),
                            restore_seconds_max=max(seconds) if seconds else None,
                            restore_seconds_mean=round(sum(seconds) / len(seconds), 3)
                            if seconds
                            else None,
                            rto_seconds=source.rto.total_seconds(),
                        )
                    )
        return rows

    def kpi_history_frame(self, periods: tuple[str, ...] = PERIODS) -> pandas.DataFrame:
        """``kpi_history`` as a DataFrame, a row per source and period, for analysis and plots;
        a figure that has no value in a period (no copy, no drill) is missing (NaN)."""
        import pandas  # about 0.3 s to import: only the KPI asset and analyses pay it

        columns = [field.name for field in fields(KpiPeriod)]
        return pandas.DataFrame.from_records(
            [row.to_dict() for row in self.kpi_history(periods)], columns=columns
        )

    def _journal_failed_runs(self) -> dict[str, list[dt.datetime]]:
        """When each source's backup runs failed, from every day file of the journal (a
        failure journaled once per failed run: the desk journals a new event only)."""
        directory = self.journal().directory
        found: dict[str, list[dt.datetime]] = {}
        if not directory.is_dir():
            return found
        for path in sorted(directory.glob("????-??-??.jsonl")):
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue  # a torn last line of a day file: not a failure
                    if entry.get("event") == "failure" and entry.get("check") == RUN_FAILED:
                        at = dt.datetime.fromisoformat(entry["at"])
                        found.setdefault(str(entry.get("source")), []).append(at)
        return found


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
