"""The ``alerts`` sensor: the evaluation ``spark-backup alerts`` runs (``service/alerts.py``),
every few minutes under the daemon, sent through the same ticket desk.

- Every alert goes to the desk (a ticket opened or commented on, the security team mailed);
  the desk knows each alert's event (the newest copy, the drill record it describes), so the
  CLI and the sensor sending the same state never open or comment twice.
- The cursor holds the alerts (key and event) that were open at the last tick: a tick reports
  only those that are new, and logs those that cleared.
- A restore drill that is overdue is also requested: one run of the source's drill asset for
  the partition of its newest copy, with a run key naming the drill asset, the partition and
  the alert's event (the last drill's time), so a re-evaluated tick, a lost cursor or a second
  daemon never asks for the same drill twice.
"""

import json
from collections.abc import Sequence

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from spark_backup.defs.drills import DrillTarget
from spark_backup.defs.resources import SparkBackupResource
from spark_backup.service.alerts import DRILL_OVERDUE_ALERT

ALERTS_SENSOR = "alerts"
# Freshness is judged in hours and the log lag in minutes (its own check runs every 5).
ALERTS_SENSOR_INTERVAL = 300


def build_alerts_sensor(targets: Sequence[DrillTarget], jobs: Sequence) -> SensorDefinition:
    @sensor(
        name=ALERTS_SENSOR,
        minimum_interval_seconds=ALERTS_SENSOR_INTERVAL,
        default_status=DefaultSensorStatus.RUNNING,
        jobs=list(jobs),
        description="Evaluates the alerts of `spark-backup alerts` (stale copies, failed or "
        "overdue drills, log lag): tickets and mail for each new one; an overdue drill is run.",
    )
    def alerts(context: SensorEvaluationContext, spark_backup: SparkBackupResource):
        loaded = json.loads(context.cursor) if context.cursor else {}
        before = set(loaded.get("open", [])) if isinstance(loaded, dict) else set()
        service = spark_backup.service
        found = service.evaluate_alerts()
        # An alert's state: its dedup key (source, partition, check) and the event it describes.
        states = {f"{a.failure.key} {a.failure.event}": a for a in found}
        now_open = set(states)
        new = [alert for state, alert in states.items() if state not in before]
        for event in sorted(before - now_open):
            context.log.info(f"cleared: {event}")
        if new:
            for alert, outcome in zip(new, service.send_alerts(new), strict=True):
                context.log.warning(
                    f"{alert.line} -> {outcome.action} {outcome.ticket or ''}"
                    + (", security team emailed" if outcome.emailed else "")
                )
                if outcome.warning:
                    context.log.warning(outcome.warning)
        requests: list[RunRequest] = []
        for alert in found:
            if alert.failure.check != DRILL_OVERDUE_ALERT:
                continue
            for target in targets:
                if target.source != alert.failure.source:
                    continue
                copies = [r.manifest for r in service.copies(target.source, target.artifact)]
                newest = max(copies, key=lambda m: (m.finished_at, m.id), default=None)
                if newest is None or not target.partitions.has_partition_key(newest.partition):
                    continue
                name = target.key.to_user_string()
                requests.append(
                    RunRequest(
                        run_key=f"{ALERTS_SENSOR}:{name}:{newest.partition}:{alert.failure.event}",
                        job_name=target.job_name,
                        asset_selection=[target.key],
                        partition_key=newest.partition,
                        tags={"spark_backup/drill": "overdue"},
                    )
                )
        cursor = json.dumps({"open": sorted(now_open)}, sort_keys=True)
        if not found:
            return SensorResult(cursor=cursor, skip_reason=SkipReason("no alerts"))
        return SensorResult(
            run_requests=requests,
            cursor=cursor,
            skip_reason=None
            if requests
            else SkipReason(f"{len(found)} alert(s), {len(new)} new; no drill to run"),
        )

    return alerts
