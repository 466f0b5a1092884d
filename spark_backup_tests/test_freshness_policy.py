"""Why the backup assets declare no Dagster ``FreshnessPolicy`` (docs/architecture.md, "Dagster
features"): the evidence, with the pinned release's own evaluator.

Dagster 1.13's ``FreshnessPolicy.time_window`` is judged by the freshness daemon
(``dagster/_daemon/freshness.py``, a preview: off unless the instance sets
``freshness: enabled: true``) with ``TimeWindowFreshnessPolicyEvaluator``, which reads the
asset's last materialization event and nothing else. spark-backup's ``freshness`` check reads
the store. On the same copies the two disagree, both ways:

- a copy deleted from the store (retention gone wrong, a lost bucket) leaves the policy
  passing, while the check fails: the policy would show green for a copy that is not there;
- a copy made by ``spark-backup backup`` on the command line (a host's cron, the first copy
  before Dagster runs) is no materialization: the policy is UNKNOWN (FAIL once any older run
  materialized), while the check passes.

If a Dagster upgrade changes this (a policy fed by observations, say), this test fails and the
decision should be revisited.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, FreshnessPolicy
from dagster._core.definitions.freshness import FreshnessState
from dagster._core.definitions.freshness_evaluator import TimeWindowFreshnessPolicyEvaluator
from dagster._core.loader import LoadingContextForTest

from spark_backup.defs.assets import backup_asset_key
from spark_backup.defs.build import build_definitions
from spark_backup.engine.cadence import partition_key_for
from spark_backup.engine.manifest import manifest_key
from spark_backup.plan import load_plan
from spark_backup.service import BackupService
from spark_backup_tests.helpers import config_source, plan_dict, write_plan

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _policy_state(defs, instance: DagsterInstance, key: AssetKey) -> FreshnessState:
    """What Dagster's freshness daemon would record for ``key``, by its own evaluator."""
    node = defs.resolve_asset_graph().get(key)
    evaluator = TimeWindowFreshnessPolicyEvaluator()
    return asyncio.run(
        evaluator.evaluate_freshness(context=LoadingContextForTest(instance), node=node)
    )


# Declaring the policy on the built definitions goes through a preview API of 1.13.
@pytest.mark.filterwarnings("ignore::dagster.PreviewWarning")
def test_a_freshness_policy_judges_runs_and_the_check_judges_copies(
    tmp_path: Path, age_key, estate: Path
) -> None:
    source = config_source("vpn_config", [str(estate / "wireguard")], cadence="daily")
    plan = write_plan(tmp_path, plan_dict([age_key[1]], [source]))
    key = backup_asset_key("vpn_config")
    # The policy the check's max_age would translate to, declared as Dagster 1.13 allows.
    defs = build_definitions(load_plan(plan)).map_resolved_asset_specs(
        func=lambda spec: spec.replace_attributes(
            freshness_policy=FreshnessPolicy.time_window(fail_window=dt.timedelta(days=1))
        ),
        selection=[key],
    )
    service = BackupService.from_path(plan)
    partition = partition_key_for("daily", dt.datetime.now(dt.UTC))

    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("daily_backups").execute_in_process(
            instance=instance, partition_key=partition, run_config=QUIET
        )
        assert result.success
        assert _policy_state(defs, instance, key) == FreshnessState.PASS
        assert service.freshness("vpn_config").ok

        # The copy vanishes from the store: the check fails, the policy stays green.
        (ref,) = service.copies("vpn_config")
        ref.store.delete(manifest_key(ref.manifest.source, ref.manifest.id))
        ref.store.delete(ref.manifest.data_key)
        assert not BackupService.from_path(plan).freshness("vpn_config").ok
        assert _policy_state(defs, instance, key) == FreshnessState.PASS

    # A copy made on the command line: fresh in the store, unknown to the policy.
    BackupService.from_path(plan).backup("vpn_config")
    with DagsterInstance.ephemeral() as instance:
        assert BackupService.from_path(plan).freshness("vpn_config").ok
        assert _policy_state(defs, instance, key) == FreshnessState.UNKNOWN
