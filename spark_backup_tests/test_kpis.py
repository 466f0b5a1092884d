"""KPIs per source: the service's figures, ``spark-backup monitor`` (table, JSON, Prometheus
text) and the ``kpis/backups`` asset's plotted metadata agree."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dagster import DagsterInstance

from spark_backup.defs.build import build_definitions
from spark_backup.defs.kpis import KPI_JOB
from spark_backup.engine.pipeline import utcnow
from spark_backup.notify import Failure
from spark_backup.notify.desk import RUN_FAILED
from spark_backup.plan import load_plan
from spark_backup.service import BackupService
from spark_backup.service.kpis import period_key
from spark_backup_tests.helpers import config_source, plan_dict, run_cli, write_plan

QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


def _plan(tmp_path: Path, age_key, estate: Path) -> Path:
    sources = [
        config_source("vpn_config", [str(estate / "wireguard")], cadence="daily", rto="30m"),
        config_source("k8s_config", [str(estate / "kube")], cadence="weekly"),
    ]
    plan = plan_dict([age_key[1]], sources)
    plan["encryption"]["identity_file"] = str(age_key[0])
    return write_plan(tmp_path, plan)


def test_kpis_from_the_stores(tmp_path: Path, age_key, estate: Path) -> None:
    service = BackupService.from_path(_plan(tmp_path, age_key, estate))
    (manifest,) = service.backup("vpn_config")
    report = service.drill("vpn_config")
    rows = {row.source: row for row in service.kpis()}
    vpn, k8s = rows["vpn_config"], rows["k8s_config"]
    assert vpn.copies == 1 and vpn.last_success == manifest.finished_at
    assert vpn.bytes == manifest.plaintext.bytes and vpn.stored_bytes == manifest.stored.bytes
    assert vpn.duration_seconds == round(manifest.duration_seconds, 3)
    assert 0 <= vpn.age_hours < 0.1
    assert vpn.drill_passed and vpn.restore_seconds == report.restore_seconds
    assert vpn.rto_seconds == 1800
    assert k8s.copies == 0 and k8s.last_success is None and k8s.last_drill is None


def test_monitor_prints_a_table_json_and_prometheus_text(tmp_path: Path, age_key, estate) -> None:
    plan = str(_plan(tmp_path, age_key, estate))
    run_cli("--plan", plan, "backup", "vpn_config", check=True)
    run_cli("--plan", plan, "drill", "vpn_config", check=True)
    table = run_cli("--plan", plan, "monitor", check=True).stdout
    assert "vpn_config" in table and "passed" in table and "/ 0.5 h" in table
    assert "never" in table  # k8s_config has no copy yet
    rows = json.loads(run_cli("--plan", plan, "monitor", "--json", check=True).stdout)
    assert {r["source"] for r in rows} == {"vpn_config", "k8s_config"}
    text = run_cli("--plan", plan, "monitor", "--prometheus", check=True).stdout
    # Every sample line is "name{labels} value", every metric has HELP and TYPE.
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    assert samples and all(
        re.fullmatch(r'spark_backup_[a-z_]+\{source="[a-z0-9_]+",artifact="[a-z]+"\} [-0-9.e+]+', s)
        for s in samples
    )
    assert 'spark_backup_drill_passed{source="vpn_config",artifact="archive"} 1.0' in samples
    assert 'spark_backup_rto_seconds{source="k8s_config",artifact="archive"} 7200.0' in samples
    by_week = json.loads(
        run_cli("--plan", plan, "monitor", "--history", "week", "--json", check=True).stdout
    )
    assert [(r["source"], r["period"], r["backups"], r["verified_rate"]) for r in by_week] == [
        ("vpn_config", "week", 1, 1.0)
    ]
    month = run_cli("--plan", plan, "monitor", "--history", "month", check=True).stdout
    assert "vpn_config" in month and "100.0 %" in month and "1/1" in month
    metrics = {s.split("{")[0] for s in samples}
    for metric in metrics:
        assert f"# TYPE {metric} gauge" in text and f"# HELP {metric} " in text


def test_kpi_asset_plots_the_figures_per_source(tmp_path: Path, age_key, estate: Path) -> None:
    plan = _plan(tmp_path, age_key, estate)
    BackupService.from_path(plan).backup("vpn_config")
    defs = build_definitions(load_plan(plan))
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def(KPI_JOB).execute_in_process(
            instance=instance, run_config=QUIET
        )
        assert result.success
        (materialization,) = result.asset_materializations_for_node("kpis__backups")
        metadata = materialization.metadata
        assert metadata["vpn_config.archive.bytes"].value > 0
        assert metadata["vpn_config.archive.rto_seconds"].value == 1800
        assert "k8s_config.archive.bytes" not in metadata
        assert "| vpn_config | archive |" in metadata["table"].value


def test_kpi_history_per_day_week_and_month(tmp_path: Path, age_key, estate: Path) -> None:
    """Success rate (failed runs from the journal), verified rate (copies whose drill passed)
    and the restore time of each drill, per period; the asset plots the current ones."""
    plan = _plan(tmp_path, age_key, estate)
    service = BackupService.from_path(plan)
    (first,) = service.backup("vpn_config")
    (second,) = service.backup("vpn_config")
    report = service.drill("vpn_config")  # the partition's newest copy: the second
    assert [s.copy_id for s in report.steps] == [second.id]
    service.report_failure(
        Failure("vpn_config", first.partition, RUN_FAILED, "run:r1", "run r1 failed")
    )
    rows = {(r.source, r.period): r for r in service.kpi_history()}
    assert {source for source, _ in rows} == {"vpn_config"}  # k8s_config: nothing yet
    for period in ("day", "week", "month"):
        row = rows[("vpn_config", period)]
        assert row.key == period_key(period, second.finished)
        assert (row.backups, row.failed_runs, row.success_rate) == (2, 1, 0.6667)
        assert (row.verified, row.verified_rate) == (1, 0.5)
        assert (row.drills, row.drills_passed) == (1, 1)
        assert row.restore_seconds_max == report.restore_seconds == row.restore_seconds_mean
        assert row.rto_seconds == 1800
    assert re.fullmatch(r"\d{4}-W\d{2}", rows[("vpn_config", "week")].key)
    # The same history as a DataFrame: a row per source and period, the same figures.
    frame = service.kpi_history_frame()
    assert len(frame) == len(rows)
    month = frame[(frame.source == "vpn_config") & (frame.period == "month")].iloc[0]
    assert (month.backups, month.failed_runs, month.success_rate) == (2, 1, 0.6667)
    assert month.verified_rate == 0.5 and month.drills_passed == 1

    defs = build_definitions(load_plan(plan))
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def(KPI_JOB).execute_in_process(
            instance=instance, run_config=QUIET
        )
        (materialization,) = result.asset_materializations_for_node("kpis__backups")
        metadata = materialization.metadata
        if period_key("month", utcnow()) == rows[("vpn_config", "month")].key:
            assert metadata["vpn_config.month.success_rate"].value == 0.6667
            assert metadata["vpn_config.month.verified_rate"].value == 0.5
        history = metadata["history"].value
        day = rows[("vpn_config", "day")].key
        assert f"| vpn_config | {day} | 2 | 1 | 66.7 % | 50.0 % | 1 | 1 |" in history
