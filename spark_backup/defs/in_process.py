"""Running a plan's jobs once, in this process, against the instance at ``$DAGSTER_HOME``: what
the schedules would do, at once (the demo, a first run after installing). Runs are recorded in
the instance, so the UI shows them as if the daemon had launched them."""

from __future__ import annotations

from collections.abc import Callable

from dagster import DagsterInstance, JobDefinition, build_sensor_context

from spark_backup.defs.build import build_definitions
from spark_backup.defs.drills import DRILL_SENSOR
from spark_backup.defs.instance import ensure_source_pools
from spark_backup.defs.schedules import FRESHNESS_JOB, OBSERVE_JOB, backup_job_name
from spark_backup.engine.cadence import partition_key_for, utcnow
from spark_backup.plan import LoadedPlan
from spark_backup.service import BackupService

# The runs' event logs are in the instance (and the UI); the console gets warnings only.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def run_plan_once(loaded: LoadedPlan, say: Callable[[str], None]) -> list[str]:
    """Observe every system, run each cadence's backup job for its current partition (with the
    checksum checks), then the freshness checks, then the drills the ``drill_new_copies``
    sensor asks for; return what failed, one line each."""
    defs = build_definitions(loaded)
    service = BackupService(loaded)
    cadences = sorted({a.cadence for s in loaded.plan.sources for a in service.artifacts(s)})
    failures: list[str] = []
    with DagsterInstance.get() as instance:
        ensure_source_pools(instance, loaded.plan)
        jobs = {j.name for j in defs.resolve_all_job_defs()}
        if OBSERVE_JOB in jobs:
            failures += _run(defs.resolve_job_def(OBSERVE_JOB), instance)
        for cadence in cadences:
            partition = partition_key_for(cadence, utcnow())
            job = defs.resolve_job_def(backup_job_name(cadence))
            say(f"running Dagster job {job.name} for partition {partition} ...")
            failures += _run(job, instance, partition)
        failures += _run(defs.resolve_job_def(FRESHNESS_JOB), instance)
        failures += _run_sensor_requests(defs, instance, DRILL_SENSOR, say)
    return failures


def _run_sensor_requests(defs, instance: DagsterInstance, sensor_name: str, say) -> list[str]:
    """Evaluate a sensor as the daemon would (from its first look) and run what it requests."""
    # A context manager: the plan resource holds the stores resource (a nested resource).
    with build_sensor_context(
        instance=instance,
        definitions=defs,
        resources=defs.get_repository_def().get_top_level_resources(),
    ) as context:
        requests = defs.resolve_sensor_def(sensor_name).evaluate_tick(context).run_requests
    failures = []
    for request in requests or []:
        job = defs.resolve_job_def(request.job_name)
        selected = ", ".join(k.to_user_string() for k in request.asset_selection or [])
        say(f"sensor {sensor_name}: running {selected or job.name} for {request.partition_key} ...")
        result = job.execute_in_process(
            instance=instance,
            partition_key=request.partition_key,
            asset_selection=request.asset_selection,
            tags=request.tags,
            raise_on_error=False,
            run_config=QUIET,
        )
        failures += _failures(job, result)
    return failures


def _run(job: JobDefinition, instance: DagsterInstance, partition: str | None = None) -> list[str]:
    result = job.execute_in_process(
        instance=instance, partition_key=partition, raise_on_error=False, run_config=QUIET
    )
    return _failures(job, result)


def _failures(job: JobDefinition, result) -> list[str]:
    failures = [] if result.success else [f"job {job.name} failed (see the run in the UI)"]
    return failures + [
        f"check {e.asset_check_key.name} on {e.asset_key.to_user_string()} failed: {e.description}"
        for e in result.get_asset_check_evaluations()
        if not e.passed
    ]
