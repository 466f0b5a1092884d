"""Sensors that turn failures into tickets and email (``notify/desk.py``):

- ``run_failures``: a failed run of any job (a backup, a drill): one failure per source the run
  selected, known by its run id;
- ``check_failures``: a failed asset check of any severity (checksum, freshness, the log's lag,
  a drill's restore or RTO), read from the event log with a cursor (the newest event's storage
  id), so every evaluation is seen once, whichever run or partition made it. A run-failure
  sensor never sees a failed check in a run that succeeded, so both are needed.

Each failure is deduplicated by source, partition and check: the first opens a ticket, a
recurrence comments on it. The desk also ignores an event it already reported, so a tick
evaluated twice opens nothing twice. Neither sensor launches runs.
"""

from collections.abc import Mapping

from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    DefaultSensorStatus,
    EventRecordsFilter,
    RunFailureSensorContext,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    run_failure_sensor,
    sensor,
)

from spark_backup.defs.resources import SparkBackupResource
from spark_backup.notify import RUN_FAILED, Failure, Outcome

RUN_FAILURE_SENSOR = "run_failures"
CHECK_FAILURE_SENSOR = "check_failures"
# Evaluations read per tick; the cursor carries on from the last one read.
CHECK_EVENTS_PER_TICK = 200
PARTITION_TAG = "dagster/partition"


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
    def run_failures(context: RunFailureSensorContext, spark_backup: SparkBackupResource):
        run = context.dagster_run
        keys = _planned_asset_keys(context.instance, run.run_id)
        sources = sorted({sources_by_asset[k] for k in keys if k in sources_by_asset})
        steps = [
            f"{event.step_key}: {_reason(event.event_specific_data.error)}"
            for event in context.get_step_failure_events()
            if event.event_specific_data and event.event_specific_data.error
        ]
        service = spark_backup.service
        desk = service.ticket_desk()
        for source in sources or ["-"]:
            failure = Failure(
                source=source,
                partition=run.tags.get(PARTITION_TAG, ""),
                check=RUN_FAILED,
                event=f"run:{run.run_id}",
                summary=f"run {run.run_id} of job {run.job_name} failed",
                detail="\n".join(steps) or (context.failure_event.message or ""),
            )
            _say(context, failure, service.report_failure(failure, desk))

    return run_failures


def build_check_failure_sensor(sources_by_asset: Mapping[AssetKey, str]) -> SensorDefinition:
    @sensor(
        name=CHECK_FAILURE_SENSOR,
        minimum_interval_seconds=30,
        default_status=DefaultSensorStatus.RUNNING,
        description="Opens a ticket and emails the security team for every failed asset "
        "check (any severity), deduplicated by source, partition and check.",
    )
    def check_failures(context: SensorEvaluationContext, spark_backup: SparkBackupResource):
        after = int(context.cursor) if context.cursor else None
        records = context.instance.event_log_storage.get_event_records(
            EventRecordsFilter(
                event_type=DagsterEventType.ASSET_CHECK_EVALUATION, after_cursor=after
            ),
            limit=CHECK_EVENTS_PER_TICK,
            ascending=True,
        )
        if not records:
            return SkipReason("no new check evaluations")
        service = spark_backup.service
        desk = service.ticket_desk()
        failed = 0
        for record in records:
            event = record.event_log_entry.dagster_event
            evaluation = event.event_specific_data if event else None
            if evaluation is None or evaluation.passed:
                continue
            failed += 1
            failure = Failure(
                source=sources_by_asset.get(evaluation.asset_key, "-"),
                partition=evaluation.partition or "",
                check=evaluation.check_name,
                event=f"check:{record.storage_id}",
                summary=f"check {evaluation.check_name} on "
                f"{evaluation.asset_key.to_user_string()} failed "
                f"({evaluation.severity.value}): {evaluation.description or ''}",
                detail=f"run {record.event_log_entry.run_id}",
            )
            _say(context, failure, service.report_failure(failure, desk))
        context.update_cursor(str(records[-1].storage_id))
        if not failed:
            return SkipReason(f"{len(records)} check evaluations, none failed")
        return None

    return check_failures
