"""``spark-backup alerts``: stale copies, overdue or failed drills, found from the stores and sent
as tickets and mail once per state; ``--dry-run`` sends nothing."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

from dagster import DagsterInstance, build_sensor_context

from spark_backup.defs.alerts import ALERTS_SENSOR
from spark_backup.defs.build import build_definitions
from spark_backup.defs.drills import drill_asset_key
from spark_backup.engine.pipeline import utcnow
from spark_backup.notify.desk import LEDGER, OUTBOX
from spark_backup.plan import load_plan
from spark_backup.service import BackupService
from spark_backup.service.alerts import DRILL_OVERDUE_ALERT, FRESHNESS_ALERT
from spark_backup_tests.helpers import config_source, plan_dict, run_cli, write_plan
from spark_backup_tests.notify_servers import smtp_server


def _plan(tmp_path: Path, age_key, estate: Path, **notifications) -> Path:
    sources = [
        config_source("vpn_config", [str(estate / "wireguard")], cadence="daily"),
        config_source("k8s_config", [str(estate / "kube")], cadence="daily", max_age="1s"),
    ]
    plan = plan_dict([age_key[1]], sources)
    plan["encryption"]["identity_file"] = str(age_key[0])
    plan["notifications"] = {"state_dir": "notifications", **notifications}
    return write_plan(tmp_path, plan)


def test_alerts_find_stale_copies_and_overdue_drills(tmp_path: Path, age_key, estate) -> None:
    service = BackupService.from_path(_plan(tmp_path, age_key, estate))
    found = {(a.failure.source, a.failure.check) for a in service.evaluate_alerts()}
    assert found == {
        (name, check)
        for name in ("vpn_config", "k8s_config")
        for check in (FRESHNESS_ALERT, DRILL_OVERDUE_ALERT)
    }
    for name in ("vpn_config", "k8s_config"):
        service.backup(name)
        service.drill(name)
    now = {(a.failure.source, a.failure.check) for a in service.evaluate_alerts()}
    assert now <= {("k8s_config", FRESHNESS_ALERT)}  # its copies may be 1 s old
    # 25 hours on: every copy is older than the plan's 24 h; a month on, the drills are overdue.
    later = {
        (a.failure.source, a.failure.check)
        for a in service.evaluate_alerts(utcnow() + dt.timedelta(hours=25))
    }
    assert later == {("vpn_config", FRESHNESS_ALERT), ("k8s_config", FRESHNESS_ALERT)}
    month = service.evaluate_alerts(utcnow() + dt.timedelta(days=33))
    assert {(a.failure.source, a.failure.check) for a in month} >= {
        ("vpn_config", DRILL_OVERDUE_ALERT)
    }


def test_cli_dry_run_sends_nothing_then_alerts_send_once(tmp_path: Path, age_key, estate) -> None:
    with smtp_server() as mailbox:
        plan = str(
            _plan(
                tmp_path,
                age_key,
                estate,
                email={
                    "port": mailbox.port,
                    "sender": "spark-backup@example.com",
                    "to": ["security@example.com"],
                },
            )
        )
        for name in ("vpn_config", "k8s_config"):
            run_cli("--plan", plan, "backup", name, check=True)
            run_cli("--plan", plan, "drill", name, check=True)
        time.sleep(1.2)  # k8s_config's copies may be 1 s old
        dry = run_cli("--plan", plan, "alerts", "--dry-run", check=True)
        assert "k8s_config: freshness: newest copy of k8s_config" in dry.stdout
        assert "(allowed 1s)" in dry.stdout and "vpn_config" not in dry.stdout
        assert "would: open a ticket (outbox)" in dry.stdout
        assert "email security@example.com" in dry.stdout
        assert "1 alert(s) (dry run: nothing sent)" in dry.stdout
        state = tmp_path / "notifications"
        assert not (state / OUTBOX).exists() and mailbox.messages == []

        sent = json.loads(run_cli("--plan", plan, "alerts", "--json", check=True).stdout)
        assert [(r["source"], r["check"], r["did"]) for r in sent] == [
            ("k8s_config", FRESHNESS_ALERT, "opened OUTBOX-1; emailed")
        ]
        assert len(mailbox.messages) == 1
        assert "freshness failed for k8s_config" in mailbox.messages[0]["Subject"]
        # The same state again: nothing new is sent.
        again = run_cli("--plan", plan, "alerts", "--dry-run", check=True).stdout
        assert "would: nothing (already reported in OUTBOX-1)" in again
        run_cli("--plan", plan, "alerts", check=True)
        assert len(mailbox.messages) == 1
        assert len((state / OUTBOX).read_text().splitlines()) == 1
        assert json.loads((state / LEDGER).read_text())["pending"] == []


def _alerts_tick(defs, instance, cursor):
    with build_sensor_context(
        instance=instance,
        cursor=cursor,
        definitions=defs,
        resources=defs.get_repository_def().get_top_level_resources(),
    ) as context:
        result = defs.resolve_sensor_def(ALERTS_SENSOR).evaluate_tick(context)
    return list(result.run_requests or []), result.cursor


def test_the_alerts_sensor_sends_each_alert_once_and_runs_an_overdue_drill(
    tmp_path: Path, age_key, estate
) -> None:
    """The evaluation of `spark-backup alerts`, as a Dagster sensor: tickets and mail for each
    new alert, an overdue drill requested under a stable run key, nothing sent twice."""
    with smtp_server() as mailbox:
        plan = _plan(
            tmp_path,
            age_key,
            estate,
            email={"port": mailbox.port, "sender": "s@example.com", "to": ["sec@example.com"]},
        )
        service = BackupService.from_path(plan)
        (copy,) = service.backup("vpn_config")
        defs = build_definitions(load_plan(plan))
        outbox = tmp_path / "notifications" / OUTBOX
        with DagsterInstance.ephemeral() as instance:
            requests, cursor = _alerts_tick(defs, instance, None)
            # vpn_config never drilled (a drill is requested); k8s_config has no copy at all
            # and was never drilled (nothing to drill: its freshness alert says why).
            opened = [json.loads(line) for line in outbox.read_text().splitlines()]
            assert sorted(e["title"] for e in opened) == sorted(
                [
                    f"spark-backup: {DRILL_OVERDUE_ALERT} failed for vpn_config (no partition)",
                    f"spark-backup: {DRILL_OVERDUE_ALERT} failed for k8s_config (no partition)",
                    f"spark-backup: {FRESHNESS_ALERT} failed for k8s_config (no partition)",
                ]
            )
            assert len(mailbox.messages) == 3
            (request,) = requests
            assert request.partition_key == copy.partition
            assert request.asset_selection == [drill_asset_key("vpn_config")]
            assert request.run_key == (
                f"{ALERTS_SENSOR}:drills/vpn_config:{copy.partition}:"
                f"alert:{DRILL_OVERDUE_ALERT}:never"
            )
            assert len(json.loads(cursor)["open"]) == 3
            # The same state: the same run key (Dagster launches a key once), nothing sent;
            # with the cursor lost too, the desk recognises every alert's event.
            for again_cursor in (cursor, None):
                again, _ = _alerts_tick(defs, instance, again_cursor)
                assert [r.run_key for r in again] == [request.run_key]
                assert len(outbox.read_text().splitlines()) == 3
                assert len(mailbox.messages) == 3
            # The drill runs (as the requested run would): its alert clears, nothing requested.
            result = defs.resolve_job_def("daily_drills").execute_in_process(
                instance=instance,
                partition_key=request.partition_key,
                asset_selection=request.asset_selection,
                raise_on_error=False,
            )
            assert result.success
            cleared, cursor = _alerts_tick(defs, instance, cursor)
            assert cleared == []
            assert all("vpn_config" not in event for event in json.loads(cursor)["open"])
