"""The Dagster layer: everything loads, names are pinned, and runs record what the UI shows."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dagster import (
    AssetCheckKey,
    AssetCheckSeverity,
    AssetKey,
    AssetSelection,
    DagsterInstance,
    Definitions,
    define_asset_job,
)

from spark_backup.defs.assets import backup_asset_key, source_pool, system_asset_key
from spark_backup.defs.build import build_definitions
from spark_backup.defs.checks import (
    CHECKSUM_CHECK,
    FRESHNESS_CHECK,
    RETENTION_CHECK,
    ROTATION_CHECK,
)
from spark_backup.defs.drills import DRILL_CHECK, RTO_CHECK, drill_asset_key, drill_schedule_name
from spark_backup.defs.kpis import KPI_ASSET, KPI_JOB
from spark_backup.defs.partitions import partitions_for
from spark_backup.defs.schedules import (
    FRESHNESS_CRON,
    FRESHNESS_JOB,
    OBSERVE_JOB,
    ROTATION_CRON,
    ROTATION_JOB,
)
from spark_backup.engine.cadence import CADENCES, DEFAULT_PARTITIONS_START, partition_key_for
from spark_backup.plan import load_plan
from spark_backup.service import BackupService
from spark_backup_tests.helpers import config_source, flip_last_byte, plan_dict, write_plan

ROOT = Path(__file__).resolve().parents[1]
INSTANCE_CONFIG = ROOT / "spark_backup" / "defs" / "dagster.yaml"
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


@pytest.fixture
def three_cadences(tmp_path: Path, age_key, estate: Path) -> Path:
    sources = [
        config_source(
            "dgx_config", [str(estate / "nvidia")], cadence="weekly", owner="team:platform"
        ),
        config_source(
            "vpn_config",
            [str(estate / "wireguard")],
            cadence="daily",
            owner="security@example.com",
            max_age="2s",
        ),
        config_source(
            "k8s_config", [str(estate / "kube")], cadence="monthly", owner="team:platform"
        ),
    ]
    return write_plan(tmp_path, plan_dict([age_key[1]], sources))


def test_definitions_load_and_are_pinned(three_cadences: Path, monkeypatch) -> None:
    monkeypatch.setenv("SPARK_BACKUP_PLAN", str(three_cadences))
    from spark_backup.definitions import defs as load_defs

    defs = load_defs()
    assert isinstance(defs, Definitions)
    graph = defs.resolve_asset_graph()
    names = ("dgx_config", "vpn_config", "k8s_config")
    keys = {AssetKey(["backups", n]) for n in names}
    drills = {drill_asset_key(n) for n in names}
    assert graph.get_all_asset_keys() == keys | drills | {system_asset_key(n) for n in names} | {
        KPI_ASSET
    }
    assert graph.asset_check_keys == {
        AssetCheckKey(k, name)
        for k in keys
        for name in (CHECKSUM_CHECK, FRESHNESS_CHECK, RETENTION_CHECK)
    } | {AssetCheckKey(system_asset_key(n), ROTATION_CHECK) for n in names} | {
        AssetCheckKey(k, name) for k in drills for name in (DRILL_CHECK, RTO_CHECK)
    }
    for name in names:  # lineage: each protected system feeds its backups
        assert graph.get(backup_asset_key(name)).parent_keys == {system_asset_key(name)}
        assert graph.get(drill_asset_key(name)).parent_keys == {backup_asset_key(name)}
    specs = {spec.key: spec for spec in defs.resolve_all_asset_specs()}
    start = DEFAULT_PARTITIONS_START
    assert specs[backup_asset_key("vpn_config")].partitions_def == partitions_for("daily", start)
    assert specs[backup_asset_key("dgx_config")].partitions_def == partitions_for("weekly", start)
    assert specs[backup_asset_key("k8s_config")].partitions_def == partitions_for("monthly", start)
    vpn = specs[backup_asset_key("vpn_config")]
    assert vpn.owners == ["security@example.com"]
    assert vpn.group_name == "config_archive"
    assert vpn.kinds == {"tar", "age", "local"}
    assert vpn.metadata["rpo"] == "1d" and vpn.metadata["max_age"] == "2s"
    assets_def = defs.resolve_assets_def(backup_asset_key("vpn_config"))
    assert assets_def.op.pool == source_pool("vpn_config")

    schedules = {s.name: defs.resolve_schedule_def(s.name) for s in defs.schedules}
    assert set(schedules) == {
        "daily_backups_schedule",
        "weekly_backups_schedule",
        "monthly_backups_schedule",
        "freshness_checks_schedule",
        f"{OBSERVE_JOB}_schedule",
        *(drill_schedule_name(c) for c in ("daily", "weekly", "monthly")),
        f"{KPI_JOB}_schedule",
        f"{ROTATION_JOB}_schedule",
    }
    assert schedules["daily_backups_schedule"].cron_schedule == "0 1 * * *"
    assert schedules["weekly_backups_schedule"].cron_schedule == "0 1 * * 1"
    assert schedules["monthly_backups_schedule"].cron_schedule == "0 1 1 * *"
    assert schedules["freshness_checks_schedule"].cron_schedule == FRESHNESS_CRON
    assert schedules[f"{ROTATION_JOB}_schedule"].cron_schedule == ROTATION_CRON
    jobs = {j.name for j in defs.resolve_all_job_defs()}
    assert {"daily_backups", "weekly_backups", "monthly_backups", FRESHNESS_JOB} <= jobs


@pytest.mark.parametrize(
    "when",
    [
        dt.datetime(2026, 1, 1, 0, 0, tzinfo=dt.UTC),
        dt.datetime(2026, 11, 27, 23, 59, tzinfo=dt.UTC),
        dt.datetime(2026, 11, 30, 0, 1, tzinfo=dt.UTC),
        dt.datetime(2027, 2, 28, 12, tzinfo=dt.UTC),
    ],
)
def test_cli_partition_keys_match_dagster(when: dt.datetime) -> None:
    for cadence in CADENCES:
        partitions = partitions_for(cadence, DEFAULT_PARTITIONS_START)
        window = partitions.time_window_for_partition_key(partition_key_for(cadence, when))
        assert window.start <= when < window.end, (cadence, when)


def test_partitions_start_is_a_plan_setting_that_moves_no_key(tmp_path: Path, age_key) -> None:
    """A new installation lists partitions from its own start; the key of a period is the same
    whatever the start, so copies of existing installations keep their partitions."""
    late = dt.date(2026, 11, 25)  # a Wednesday
    for cadence in CADENCES:
        early_keys = partitions_for(cadence, DEFAULT_PARTITIONS_START).get_partition_keys()
        late_keys = partitions_for(cadence, late).get_partition_keys()
        assert set(late_keys) <= set(early_keys) and len(late_keys) < len(early_keys)
        # The first partition is the period that holds the start day.
        first = dt.datetime.combine(late, dt.time(), dt.UTC)
        assert late_keys[0] == partition_key_for(cadence, first)
    plan = plan_dict(
        [age_key[1]],
        [config_source("vpn_config", [str(tmp_path)], cadence="weekly")],
        defaults={"partitions_start": late.isoformat()},
    )
    defs = build_definitions(load_plan(write_plan(tmp_path, plan)))
    spec = next(
        s for s in defs.resolve_all_asset_specs() if s.key == backup_asset_key("vpn_config")
    )
    assert spec.partitions_def.get_first_partition_key() == "2026-11-23"


def _with_job(defs: Definitions, name: str, selection) -> Definitions:
    return Definitions.merge(defs, Definitions(jobs=[define_asset_job(name, selection=selection)]))


def test_backup_run_records_metadata_and_checks(three_cadences: Path, age_key) -> None:
    loaded = load_plan(three_cadences)
    defs = build_definitions(loaded)
    partition = partition_key_for("daily", dt.datetime.now(dt.UTC))
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("daily_backups").execute_in_process(
            instance=instance, partition_key=partition, run_config=QUIET
        )
        assert result.success
        (materialization,) = result.asset_materializations_for_node("backups__vpn_config")
        metadata = materialization.metadata
        copy_id = metadata["copy_id"].value
        assert materialization.partition == partition
        assert metadata["bytes"].value > 0 and metadata["stored_bytes"].value > 0
        assert metadata["compression_ratio"].value > 0 and metadata["duration_seconds"].value >= 0
        assert metadata["uri"].value.startswith("file://") and copy_id in metadata["uri"].value
        assert metadata["files"].value == 2
        evaluations = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
        assert (
            evaluations[CHECKSUM_CHECK].passed
            and evaluations[CHECKSUM_CHECK].partition == partition
        )
        assert evaluations[FRESHNESS_CHECK].passed

        # Damage the stored copy: the checksum check, run alone for that partition, fails as ERROR.
        service = BackupService(loaded)
        ref = service.find(copy_id)
        path = Path(ref.store.object_uri(ref.manifest.data_key).removeprefix("file://"))
        path.write_bytes(flip_last_byte(path.read_bytes()))
        key = AssetCheckKey(backup_asset_key("vpn_config"), CHECKSUM_CHECK)
        checks_only = _with_job(defs, "checksum_only", AssetSelection.checks(key))
        # As the UI launches it: a run of the check alone, tagged with the partition (an
        # in-process partition_key is only accepted for jobs that contain assets).
        rerun = checks_only.resolve_job_def("checksum_only").execute_in_process(
            instance=instance,
            tags={"dagster/partition": partition},
            run_config=QUIET,
            raise_on_error=False,
        )
        (evaluation,) = rerun.get_asset_check_evaluations()
        assert not evaluation.passed
        assert evaluation.severity == AssetCheckSeverity.ERROR
        assert "stored bytes do not match the manifest" in evaluation.description


def test_freshness_fails_when_newest_copy_is_too_old_or_missing(three_cadences: Path) -> None:
    defs = build_definitions(load_plan(three_cadences))
    job = defs.resolve_job_def(FRESHNESS_JOB)
    with DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(instance=instance, run_config=QUIET, raise_on_error=False)
        evaluations = {e.asset_key.path[-1]: e for e in result.get_asset_check_evaluations()}
        assert set(evaluations) == {"dgx_config", "vpn_config", "k8s_config"}
        assert not evaluations["vpn_config"].passed
        assert "no copy of vpn_config exists" in evaluations["vpn_config"].description

        BackupService.from_path(three_cadences).backup("vpn_config")
        result = job.execute_in_process(instance=instance, run_config=QUIET, raise_on_error=False)
        fresh = next(
            e for e in result.get_asset_check_evaluations() if e.asset_key.path[-1] == "vpn_config"
        )
        assert fresh.passed and fresh.metadata["age_hours"].value < 0.01

        time.sleep(2.2)  # the plan allows vpn_config copies to be 2 s old
        result = job.execute_in_process(instance=instance, run_config=QUIET, raise_on_error=False)
        stale = next(
            e for e in result.get_asset_check_evaluations() if e.asset_key.path[-1] == "vpn_config"
        )
        assert not stale.passed and stale.severity == AssetCheckSeverity.ERROR
        assert "allowed 2s" in stale.description


def test_instance_config_is_valid_and_limits_runs_per_source(tmp_path: Path) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(INSTANCE_CONFIG.read_text())
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    probe = (
        "from dagster import DagsterInstance\n"
        "i = DagsterInstance.get()\n"
        "c = i.get_concurrency_config()\n"
        "print(type(i.run_storage).__name__, type(i.run_coordinator).__name__,"
        " c.pool_config.default_pool_limit, c.pool_config.pool_granularity.value,"
        " i.nux_enabled if hasattr(i, 'nux_enabled') else 'n/a')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    storage, coordinator, limit, granularity, _nux = out.stdout.split()
    assert storage == "SqliteRunStorage" and coordinator == "QueuedRunCoordinator"
    assert (limit, granularity) == ("1", "run")
    config = yaml.safe_load(INSTANCE_CONFIG.read_text())
    assert config["nux"] == {"enabled": False}


def test_workspace_loads_with_dagster_cli(three_cadences: Path, tmp_path: Path) -> None:
    assert yaml.safe_load((ROOT / "workspace.yaml").read_text()) == {
        "load_from": [
            {
                "python_module": {
                    "module_name": "spark_backup.definitions",
                    "location_name": "spark_backup",
                }
            }
        ]
    }
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            "definitions",
            "validate",
            "-w",
            "workspace.yaml",
        ],
        cwd=ROOT,
        env={**os.environ, "SPARK_BACKUP_PLAN": str(three_cadences), "DAGSTER_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the snapshot: what the UI shows, pinned -----------------------------------------------------

SNAPSHOT = Path(__file__).parent / "snapshots" / "definitions.json"
UPDATE_ENV = "SPARK_BACKUP_UPDATE_SNAPSHOTS"


def definitions_snapshot(defs: Definitions) -> dict:
    """Every asset key (with its group, kinds, owners, partitions and upstream keys), check,
    job, schedule, sensor, pool and resource, as plain data: a renamed asset or a lost edge shows as a diff."""
    graph = defs.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        partitions = node.partitions_def
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "kinds": sorted(node.kinds),
            "owners": list(node.owners),
            "partitions": partitions.get_cron_schedule() if partitions else None,
            "upstream": sorted(k.to_user_string() for k in node.parent_keys),
            "observable": node.is_observable,
            "pool": next(iter(node.pools), None) if node.pools else None,
        }
    return {
        "assets": assets,
        "checks": sorted(
            f"{c.asset_key.to_user_string()}:{c.name}" for c in graph.asset_check_keys
        ),
        "jobs": sorted(j.name for j in defs.resolve_all_job_defs() if not j.name.startswith("__")),
        "schedules": {
            s.name: defs.resolve_schedule_def(s.name).cron_schedule
            for s in sorted(defs.schedules or [], key=lambda s: s.name)
        },
        "sensors": sorted(s.name for s in defs.sensors or []),
        # One resource per concern (defs/resources.py), by key and implementation.
        "resources": {key: type(r).__name__ for key, r in sorted((defs.resources or {}).items())},
    }


def test_definitions_match_the_snapshot(tmp_path: Path, age_key) -> None:
    """Asset keys, checks, jobs, schedules, sensors and pools of a plan with one source of each
    kind are pinned; set SPARK_BACKUP_UPDATE_SNAPSHOTS=1 to accept a deliberate change."""
    sources = [
        config_source(
            "vpn_config", [str(tmp_path)], cadence="weekly", owner="team:security", critical=True
        ),
        {
            "name": "pg_main",
            "kind": "postgres",
            "cadence": "daily",
            "owner": "team:dba",
            "critical": True,
        },
        {
            "name": "docs",
            "kind": "mongodb",
            "cadence": "daily",
            "owner": "team:dba",
            "uri": "mongodb://backup@db1:27017/?replicaSet=rs0",
        },
    ]
    plan = plan_dict([age_key[1]], sources, defaults={"partitions_start": "2026-11-01"})
    snapshot = definitions_snapshot(build_definitions(load_plan(write_plan(tmp_path, plan))))
    text = json.dumps(snapshot, indent=2, sort_keys=True) + "\n"
    if os.environ.get(UPDATE_ENV):
        SNAPSHOT.write_text(text)
    assert text == SNAPSHOT.read_text(), (
        f"definitions changed; review, then rerun with {UPDATE_ENV}=1"
    )


def test_a_run_of_one_asset_runs_in_process_and_a_run_of_several_in_parallel(
    three_cadences: Path,
) -> None:
    """The code location's executor picks by the run's plan: a backfill's run of one source
    (its asset and checks) has one asset step, so its steps run in the run's own process; a run
    of every source has one per source, run in parallel in forked processes."""
    from dagster._core.execution.api import create_execution_plan

    from spark_backup.defs.executor import asset_count_executor, asset_steps

    defs = build_definitions(load_plan(three_cadences))
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.executor_def is asset_count_executor
    key = backup_asset_key("vpn_config")
    one = job.get_subset(asset_selection={key}, asset_check_selection=None)
    plan = create_execution_plan(one, run_config={})
    assert len(plan.step_keys_to_execute) == 4  # the backup and its three checks
    assert asset_steps(plan) == 1
    backups = {backup_asset_key(n) for n in ("dgx_config", "vpn_config", "k8s_config")}
    several = job.get_subset(asset_selection=backups, asset_check_selection=None)
    assert asset_steps(create_execution_plan(several, run_config={})) == 3
