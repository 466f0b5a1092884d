"""``spark-backup alerts``: stale copies, overdue or failed drills, found from the stores and sent
as tickets and mail once per state; ``--dry-run`` sends nothing."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

from spark_backup.engine.pipeline import utcnow
from spark_backup.notify.desk import LEDGER, OUTBOX
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
