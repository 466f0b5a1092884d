"""The code location's executor: a run's steps in the run's own process when it materializes
one asset, in processes of their own when it materializes several.

A run of one asset (a backfill's run of one partition of one source, the UI's Materialize of one
source, a drill the sensor asks for) runs the asset and its checks one after the other anyway:
the checks read the copy the asset step wrote. Forking a step process each would only add a
process start per step (seconds on a loaded host, for steps that take a fraction of that). A
run of several assets (a cadence's backup job over every source, the monthly drills) runs them
in parallel, each in a process forked from a server that imported Dagster and this package once
(``forkserver``): a fresh interpreter per step pays those imports per backup, check and
freshness step."""

from __future__ import annotations

from collections.abc import Iterator

from dagster import (
    Executor,
    InitExecutorContext,
    executor,
    in_process_executor,
    multiple_process_executor_requirements,
    multiprocess_executor,
)

IN_PROCESS_CONFIG = {"retries": {"enabled": {}}}
PARALLEL_CONFIG = {
    "retries": {"enabled": {}},
    "start_method": {"forkserver": {}},
    "max_concurrent": None,
    "tag_concurrency_limits": None,
}


class AssetCountExecutor(Executor):
    """Dagster's in-process executor for a run of at most one asset step, its forkserver
    multiprocess executor otherwise."""

    def __init__(self, in_process: Executor, parallel: Executor):
        self.in_process = in_process
        self.parallel = parallel

    @property
    def retries(self):
        return self.parallel.retries

    @property
    def step_dependency_config(self):
        return self.parallel.step_dependency_config

    def execute(self, plan_context, execution_plan) -> Iterator:
        chosen = self.in_process if asset_steps(execution_plan) <= 1 else self.parallel
        yield from chosen.execute(plan_context, execution_plan)


def asset_steps(execution_plan) -> int:
    """How many of the plan's steps materialize an asset (checks do not count)."""
    return sum(
        1
        for step in execution_plan.get_steps_to_execute_in_topo_order()
        if any(
            output.properties is not None
            and output.properties.asset_key is not None
            and output.properties.asset_check_key is None
            for output in step.step_outputs
        )
    )


@executor(
    name="in_process_for_one_asset",
    requirements=multiple_process_executor_requirements(),
)
def asset_count_executor(context: InitExecutorContext) -> Executor:
    return AssetCountExecutor(
        in_process_executor.executor_creation_fn(
            context._replace(executor_def=in_process_executor, executor_config=IN_PROCESS_CONFIG)
        ),
        multiprocess_executor.executor_creation_fn(
            context._replace(executor_def=multiprocess_executor, executor_config=PARALLEL_CONFIG)
        ),
    )
