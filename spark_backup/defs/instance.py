"""Preparing a Dagster instance for a plan: its config file and one pool per source.

Each backup asset runs in its own pool (``defs/assets.py``); ``dagster.yaml`` limits pools to
one run at a time. Dagster 1.13 creates a pool's limit lazily, after the run queue has read the
configured pools, so in the very first queue pass that sees a new pool two runs of the same
source could both start. Setting every source's pool up front closes that gap.
"""

import os
import shutil
from importlib import resources
from pathlib import Path

from dagster import DagsterInstance

from spark_backup.defs.assets import source_pool
from spark_backup.errors import UsageError
from spark_backup.plan import Plan

SOURCE_POOL_LIMIT = 1
INSTANCE_CONFIG = "dagster.yaml"


def install_instance_config(dagster_home: Path, template: Path | None = None) -> bool:
    """Copy ``template`` (default: spark-backup's dagster.yaml) into DAGSTER_HOME unless one is
    there; True if copied."""
    source = template or Path(str(resources.files("spark_backup.defs").joinpath(INSTANCE_CONFIG)))
    if not source.is_file():
        raise UsageError(f"{source}: instance config not found")
    dagster_home.mkdir(parents=True, exist_ok=True)
    target = dagster_home / INSTANCE_CONFIG
    if target.exists():
        return False
    shutil.copyfile(source, target)
    return True


def ensure_source_pools(instance: DagsterInstance, plan: Plan) -> list[str]:
    """Give every source's pool its limit, unless an operator set one; return the pools set."""
    explicit = {p.name for p in instance.event_log_storage.get_pool_limits() if not p.from_default}
    changed = []
    for source in plan.sources:
        pool = source_pool(source.name)
        if pool not in explicit:
            instance.event_log_storage.set_concurrency_slots(pool, SOURCE_POOL_LIMIT)
            changed.append(pool)
    return changed


def prepare_instance(
    dagster_home: Path, plan: Plan, template: Path | None = None
) -> tuple[bool, list[str]]:
    """Install the instance config (unless one is there) and set every source's pool; return
    whether the config was installed and the pools set."""
    installed = install_instance_config(dagster_home, template)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    with DagsterInstance.get() as instance:
        pools = ensure_source_pools(instance, plan)
    return installed, pools
