"""Sensors that turn failures into tickets and email (``notify/desk.py``):

- ``run_failures``: a failed run of any job (a backup, a drill): one failure per source the run
  selected, known by its run id;
- ``check_failures``: a failed asset check of any severity (checksum, freshness, the log's lag,
  a drill's restore or RTO), read from each check's execution history with a cursor per check
  (the newest execution id below which every execution finished), so every evaluation is seen,
  whichever run or partition made it. (Not the event log by storage id: on Dagster's default
  SQLite storage, check evaluations are kept per run, and their ids are not global.) A run-failure
  sensor never sees a failed check in a run that succeeded, so both are needed.

Each failure is deduplicated by source, partition and check: the first opens a ticket, a
recurrence comments on it. The desk also ignores an event it already reported, so a tick
evaluated twice opens nothing twice. Neither sensor launches runs.
"""

import json
from collections.abc import Mapping, Sequence

from dagster import (
    AssetCheckKey,
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    DefaultSensorStatus,
    RunFailureSensorContext,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    run_failure_sensor,
    sensor,
)

from spark_backup.defs.resources import NotifierResource
from spark_backup.notify import RUN_FAILED, Failure, Outcome

RUN_FAILURE_SENSOR = "run_failures"
CHECK_FAILURE_SENSOR = "check_failures"
# Executions read per check and tick; the cursor carries on from there.
CHECK_EVENTS_PER_TICK = 200
PARTITION_TAG = "dagster/partition"
# Check execution statuses (AssetCheckExecutionRecordStatus, which Dagster does not export).
PLANNED, FAILED = "PLANNED", "FAILED"


def _say(context, failure: Failure, outcome: Outcome) -> None:
    context.log.info(
        f"{failure.key}: ticket {outcome.action} {outcome.ticket or ''}"
        + (", security team emailed" if outcome.emailed else "")
    )
    for line in outcome.delivered:
        context.log.info(f"delivered from the queue: {line}")
    if outcome.warning:
        context.log.warning(outcome.warning)


def _reason(error) -> str:
    """The innermost cause of a step's error: spark-backup's own one-line message, not
    Dagster's wrapper around it."""
    while error.cause is not None:
        error = error.cause
    return error.message.strip()


def _planned_asset_keys(instance: DagsterInstance, run_id: str) -> set[AssetKey]:
    """The assets a run set out to materialize or check (its job's, or the UI's selection)."""
    keys = set()
    for event_type in (
        DagsterEventType.ASSET_MATERIALIZATION_PLANNED,
        DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED,
    ):
        for record in instance.get_records_for_run(run_id, of_type=event_type).records:
            event = record.event_log_entry.dagster_event
            if event is not None and event.event_specific_data is not None:
                keys.add(event.event_specific_data.asset_key)
    return keys


def build_run_failure_sensor(sources_by_asset: Mapping[AssetKey, str]) -> SensorDefinition:
    @run_failure_sensor(
        name=RUN_FAILURE_SENSOR,
        default_status=DefaultSensorStatus.RUNNING,
        description="Opens a ticket and emails the security team for every failed run.",
    )
    def run_failures(context: RunFailureSensorContext, notifier: NotifierResource):
        run = context.dagster_run
        keys = _planned_asset_keys(context.instance, run.run_id)
        sources = sorted({sources_by_asset[k] for k in keys if k in sources_by_asset})
        steps = [
            f"{event.step_key}: {_reason(event.event_specific_data.error)}"
            for event in context.get_step_failure_events()
            if event.event_specific_data and event.event_specific_data.error
        ]
        desk = notifier.desk()
        for source in sources or ["-"]:
            failure = Failure(
                source=source,
                partition=run.tags.get(PARTITION_TAG, ""),
                check=RUN_FAILED,
                event=f"run:{run.run_id}",
                summary=f"run {run.run_id} of job {run.job_name} failed",
                detail="\n".join(steps) or (context.failure_event.message or ""),
            )
            _say(context, failure, notifier.report(failure, desk))

    return run_failures


def build_check_failure_sensor(
    sources_by_asset: Mapping[AssetKey, str], check_keys: Sequence[AssetCheckKey]
) -> SensorDefinition:
    @sensor(
        name=CHECK_FAILURE_SENSOR,
        minimum_interval_seconds=30,
        default_status=DefaultSensorStatus.RUNNING,
        description="Opens a ticket and emails the security team for every failed asset "
        "check (any severity), deduplicated by source, partition and check.",
    )
    def check_failures(context: SensorEvaluationContext, notifier: NotifierResource):
        # Per check: every execution up to this id has finished (and its failure, if any, was
        # reported). An execution is recorded when planned and completed later under the same
        # id, so the cursor stops below the oldest one still running.
        loaded = json.loads(context.cursor) if context.cursor else {}
        cursor: dict[str, int] = loaded if isinstance(loaded, dict) else {}  # else: start over
        storage = context.instance.event_log_storage
        desk = notifier.desk()
        failed = seen = 0
        for check_key in check_keys:
            name = check_key.to_user_string()
            done = cursor.get(name, 0)
            records = [
                r
                for r in storage.get_asset_check_execution_history(
                    check_key, limit=CHECK_EVENTS_PER_TICK
                )
                if r.id > done
            ]
            running = [r.id for r in records if r.status.value == PLANNED]
            for record in sorted(records, key=lambda r: r.id):
                seen += 1
                if record.status.value != FAILED or record.event is None:
                    continue
                evaluation = record.event.dagster_event.event_specific_data
                failed += 1
                failure = Failure(
                    source=sources_by_asset.get(check_key.asset_key, "-"),
                    partition=record.partition or "",
                    check=check_key.name,
                    event=f"check:{name}:{record.id}",
                    summary=f"check {check_key.name} on {check_key.asset_key.to_user_string()} "
                    f"failed ({evaluation.severity.value}): {evaluation.description or ''}",
                    detail=f"run {record.run_id}",
                )
                _say(context, failure, notifier.report(failure, desk))
            if records:
                cursor[name] = (min(running) - 1) if running else max(r.id for r in records)
        context.update_cursor(json.dumps(cursor, sort_keys=True))
        if not failed:
            return SkipReason(f"{seen} new check executions, none failed")
        return None

    return check_failures
