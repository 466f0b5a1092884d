"""Restore drills: staging restored, checked, timed against the RTO, torn down and recorded, from
the service, the command line and Dagster."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest
from dagster import (
    AssetCheckKey,
    AssetKey,
    DagsterInstance,
    build_schedule_context,
    build_sensor_context,
)

from spark_backup.defs.build import build_definitions
from spark_backup.defs.drills import (
    DRILL_CHECK,
    DRILL_CRON,
    DRILL_SENSOR,
    RTO_CHECK,
    drill_asset_key,
    drill_job_name,
    drill_schedule_name,
)
from spark_backup.engine.cadence import partition_key_for
from spark_backup.engine.drill_record import drill_prefix
from spark_backup.engine.pipeline import utcnow
from spark_backup.errors import NotFoundError, UsageError
from spark_backup.plan import load_plan
from spark_backup.service import BackupService
from spark_backup_tests.helpers import (
    config_source,
    flip_last_byte,
    plan_dict,
    run_cli,
    write_plan,
)
from spark_backup_tests.test_postgres import dump_plan, run_sql, sample_db  # noqa: F401 - fixtures

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
TASKS = "Agenten_Aufgaben_Uebersicht.csv"
DOD = "DEFINITION_OF_DONE.md"
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


@pytest.fixture
def drill_plan(tmp_path: Path, age_key, estate: Path) -> Path:
    sources = [
        config_source("vpn_config", [str(estate / "wireguard")], cadence="daily"),
        config_source("dgx_config", [str(estate / "nvidia")], cadence="weekly", rto="1s"),
    ]
    plan = plan_dict([age_key[1]], sources)
    plan["encryption"]["identity_file"] = str(age_key[0])
    return write_plan(tmp_path, plan)


def _data_path(service: BackupService, copy_id: str) -> Path:
    ref = service.find(copy_id)
    return Path(ref.store.object_uri(ref.manifest.data_key).removeprefix("file://"))


def test_drill_restores_checks_times_tears_down_and_records(drill_plan: Path, tmp_path) -> None:
    service = BackupService.from_path(drill_plan)
    (manifest,) = service.backup("vpn_config")
    staging_root = tmp_path / "staging"
    staging_root.mkdir()
    report = service.drill("vpn_config", staging_root=staging_root)
    assert report.passed and report.within_rto and report.torn_down
    assert report.partition == manifest.partition
    (step,) = report.steps
    assert step.copy_id == manifest.id and step.check == "tree"
    assert step.metrics["files"] == manifest.source_metadata["files"]
    assert report.rto_seconds == 7200  # the plan's default RTO: 2 h
    assert list(staging_root.iterdir()) == []  # the drill's own staging is gone
    record = service.drill_status("vpn_config")[manifest.id]
    assert record.passed and record.within_rto and record.rto_seconds == 7200
    assert record.restore_seconds == step.seconds
    # The record lies beside the copy, and the copy still lists and verifies as before.
    store = service.store_for(service.plan.source("vpn_config"))
    assert [i.key for i in store.list(drill_prefix("vpn_config"))] == report.records
    assert [r.manifest.id for r in service.copies("vpn_config")] == [manifest.id]


def test_drill_of_a_damaged_copy_fails_and_says_why(drill_plan: Path) -> None:
    service = BackupService.from_path(drill_plan)
    (manifest,) = service.backup("vpn_config")
    path = _data_path(service, manifest.id)
    path.write_bytes(flip_last_byte(path.read_bytes()))
    report = service.drill("vpn_config")
    assert not report.passed and report.torn_down
    assert "do not match" in report.steps[0].description or report.steps[0].description
    assert not service.drill_status("vpn_config")[manifest.id].passed


def test_drill_over_the_rto_is_recorded_as_such(drill_plan: Path) -> None:
    service = BackupService.from_path(drill_plan)
    service.backup("dgx_config")
    report = service.drill("dgx_config")
    assert report.passed and report.rto_seconds == 1
    assert report.within_rto == (report.restore_seconds <= 1)


def test_drill_without_a_copy_is_a_clear_error(drill_plan: Path) -> None:
    service = BackupService.from_path(drill_plan)
    with pytest.raises(NotFoundError, match="no committed copy of vpn_config"):
        service.drill("vpn_config")
    service.backup("vpn_config")
    with pytest.raises(NotFoundError, match="partition 2020-01-01"):
        service.drill("vpn_config", partition="2020-01-01")


def test_cli_drill_and_list_show_drilled_status(drill_plan: Path) -> None:
    plan = str(drill_plan)
    run_cli("--plan", plan, "backup", "vpn_config", check=True)
    listed = json.loads(run_cli("--plan", plan, "list", "--json", check=True).stdout)
    assert listed[0]["drill"] is None
    report = json.loads(run_cli("--plan", plan, "drill", "vpn_config", "--json", check=True).stdout)
    assert report["passed"] and report["within_rto"]
    (row,) = json.loads(run_cli("--plan", plan, "list", "--json", check=True).stdout)
    assert row["drill"]["passed"] and row["drill"]["rto_seconds"] == 7200
    table = run_cli("--plan", plan, "list", check=True).stdout
    assert "drilled" in table and "passed" in table and "/2h" in table


def test_drill_asset_materializes_with_checks_per_partition(drill_plan: Path) -> None:
    loaded = load_plan(drill_plan)
    defs = build_definitions(loaded)
    partition = partition_key_for("daily", utcnow())
    key = drill_asset_key("vpn_config")
    graph = defs.resolve_asset_graph()
    assert graph.get(key).parent_keys == {AssetKey(["backups", "vpn_config"])}
    assert {
        AssetCheckKey(key, DRILL_CHECK),
        AssetCheckKey(key, RTO_CHECK),
    } <= graph.asset_check_keys
    with DagsterInstance.ephemeral() as instance:
        backup = defs.resolve_job_def("daily_backups").execute_in_process(
            instance=instance, partition_key=partition, run_config=QUIET
        )
        assert backup.success
        result = defs.resolve_job_def(drill_job_name("daily")).execute_in_process(
            instance=instance, partition_key=partition, run_config=QUIET
        )
        assert result.success
        (materialization,) = result.asset_materializations_for_node("drills__vpn_config")
        assert materialization.partition == partition
        assert materialization.metadata["rto_seconds"].value == 7200
        assert materialization.metadata["restore_seconds"].value > 0
        evaluations = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
        assert evaluations[DRILL_CHECK].passed and evaluations[DRILL_CHECK].partition == partition
        assert evaluations[RTO_CHECK].passed


def test_monthly_schedules_request_one_drill_per_cadence_and_partition(drill_plan: Path) -> None:
    defs = build_definitions(load_plan(drill_plan))
    when = dt.datetime(2026, 12, 1, 3, tzinfo=dt.UTC)
    expected = {"daily": "2026-12-01", "weekly": "2026-11-30"}
    with DagsterInstance.ephemeral() as instance:
        for cadence_name, partition in expected.items():
            schedule = defs.resolve_schedule_def(drill_schedule_name(cadence_name))
            assert schedule.cron_schedule == DRILL_CRON
            assert schedule.job_name == drill_job_name(cadence_name)
            context = build_schedule_context(
                instance=instance,
                scheduled_execution_time=when,
                repository_def=defs.get_repository_def(),
            )
            (request,) = schedule.evaluate_tick(context).run_requests
            assert request.partition_key == partition
            assert request.run_key == f"{drill_job_name(cadence_name)}:{partition}"


def test_postgres_drill_restores_into_a_scratch_database_and_drops_it(
    dump_plan: Path,  # noqa: F811 - the fixture imported above
    sample_db: str,  # noqa: F811
) -> None:
    """Real PostgreSQL: the dump is restored into a scratch database of the drill's own, its
    rows counted against the dump, the scratch database dropped; the source is untouched."""
    service = BackupService.from_path(dump_plan)
    manifests = service.backup("pg_main")
    ours = f"SELECT datname FROM pg_database WHERE datname LIKE '{sample_db}%' ORDER BY 1"
    before = run_sql(ours)
    report = service.drill("pg_main")
    assert report.passed and report.within_rto and report.torn_down
    steps = {step.part: step for step in report.steps}
    assert set(steps) == {m.part for m in manifests}
    database = steps[f"database:{sample_db}"]
    assert database.check == "row_counts" and database.metrics["rows"] == 5010
    assert run_sql(ours) == before == [(sample_db,)]
    drilled = service.drill_status("pg_main")
    assert {m.id for m in manifests} == set(drilled)
    assert all(r.passed and r.drill_seconds == report.restore_seconds for r in drilled.values())


# --- the sensor: one drill for every new copy ----------------------------------------------------


def _sensor_tick(defs, instance, cursor):
    with build_sensor_context(
        instance=instance,
        cursor=cursor,
        definitions=defs,
        resources=defs.get_repository_def().get_top_level_resources(),
    ) as context:
        result = defs.resolve_sensor_def(DRILL_SENSOR).evaluate_tick(context)
    return list(result.run_requests or []), result.cursor


def test_a_new_copy_is_drilled_once_through_the_sensor_and_journaled(
    drill_plan: Path, tmp_path: Path
) -> None:
    """The first end-to-end path: a copy lands (a Dagster run), the sensor requests its drill,
    the drill passes, the journal, the task overview and the Definition of Done are updated;
    a copy made from the command line is drilled too, and nothing is requested twice."""
    (tmp_path / "docs").mkdir()
    shutil.copyfile(EXAMPLES / "Agenten_Aufgaben_Uebersicht.csv", tmp_path / TASKS)
    shutil.copyfile(EXAMPLES / "DEFINITION_OF_DONE.md", tmp_path / "docs" / DOD)
    defs = build_definitions(load_plan(drill_plan))
    partition = partition_key_for("daily", utcnow())
    with DagsterInstance.ephemeral() as instance:
        requests, cursor = _sensor_tick(defs, instance, None)
        assert requests == []  # no copy yet
        assert (
            defs.resolve_job_def("daily_backups")
            .execute_in_process(instance=instance, partition_key=partition, run_config=QUIET)
            .success
        )
        (request,), cursor = _sensor_tick(defs, instance, cursor)
        (copy,) = BackupService.from_path(drill_plan).copies("vpn_config")
        assert request.partition_key == partition
        assert request.asset_selection == [drill_asset_key("vpn_config")]
        assert request.run_key == f"drills/vpn_config:{partition}:{copy.manifest.id}"
        assert _sensor_tick(defs, instance, cursor)[0] == []  # seen: not again
        result = defs.resolve_job_def(request.job_name).execute_in_process(
            instance=instance,
            partition_key=request.partition_key,
            asset_selection=request.asset_selection,
            run_config=QUIET,
        )
        assert result.success
        assert all(e.passed for e in result.get_asset_check_evaluations())
        # A copy from the command line is a new copy too.
        run_cli("--plan", str(drill_plan), "backup", "vpn_config", check=True)
        (again,), cursor = _sensor_tick(defs, instance, cursor)
        assert again.partition_key == partition and again.run_key != request.run_key
    journal = tmp_path / "orchestration_journal" / "backups"
    events = [
        json.loads(line)["event"]
        for f in journal.glob("*.jsonl")
        for line in f.read_text().splitlines()
    ]
    assert events.count("drill") == 1 and events.count("backup") == 2
    assert (
        '"restore-drill";' in (tmp_path / TASKS).read_text()
        and '"erledigt"' in (tmp_path / TASKS).read_text()
    )
    assert "- [x] Restore-Probe" in (tmp_path / "docs" / DOD).read_text()


def test_sampling_drills_one_new_partition_in_n(tmp_path: Path, age_key, estate: Path) -> None:
    plan = plan_dict(
        [age_key[1]],
        [config_source("vpn_config", [str(estate)], cadence="daily", drill_every=2)],
    )
    path = write_plan(tmp_path, plan)
    defs = build_definitions(load_plan(path))
    service = BackupService.from_path(path)
    service.backup("vpn_config", "2026-11-01")
    with DagsterInstance.ephemeral() as instance:
        (first,), cursor = _sensor_tick(defs, instance, None)  # the newest partition only
        assert first.partition_key == "2026-11-01"
        for day in ("2026-11-02", "2026-11-03", "2026-11-04"):
            service.backup("vpn_config", day)
        requests, cursor = _sensor_tick(defs, instance, cursor)
        assert [r.partition_key for r in requests] == ["2026-11-03"]


def test_drill_into_a_missing_staging_folder_is_a_clear_error(drill_plan: Path, tmp_path) -> None:
    service = BackupService.from_path(drill_plan)
    service.backup("vpn_config")
    with pytest.raises(UsageError, match=r"cannot make the drill's staging folder in .*absent"):
        service.drill("vpn_config", staging_root=tmp_path / "absent")
    assert service.drill_status("vpn_config") == {}


def test_prune_removes_the_drill_records_of_expired_copies(
    tmp_path: Path, age_key, estate: Path
) -> None:
    plan = plan_dict(
        [age_key[1]],
        [
            config_source(
                "vpn_config",
                [str(estate)],
                cadence="daily",
                retention={"daily": 1, "weekly": 0, "monthly": 0},
            )
        ],
    )
    plan["encryption"]["identity_file"] = str(age_key[0])
    service = BackupService.from_path(write_plan(tmp_path, plan))
    (old,) = service.backup("vpn_config")
    service.drill("vpn_config")
    (new,) = service.backup("vpn_config")
    service.drill("vpn_config")
    assert set(service.drill_status("vpn_config")) == {old.id, new.id}
    report = service.prune(dry_run=False)
    assert report.expired == [old.id]
    assert set(service.drill_status("vpn_config")) == {new.id}
