"""Tickets and email for every failure, against real servers: jira820 (Jira DC REST v2), a
webhook receiver and aiosmtpd. One ticket per failure, a comment when it recurs, nothing lost
when a backend is down, secrets from the environment only and never in what is sent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dagster import (
    AssetCheckKey,
    AssetSelection,
    DagsterInstance,
    DagsterRunStatus,
    Definitions,
    build_run_status_sensor_context,
    build_sensor_context,
    define_asset_job,
)

from spark_backup.defs.assets import backup_asset_key
from spark_backup.defs.build import build_definitions
from spark_backup.defs.checks import CHECKSUM_CHECK
from spark_backup.defs.sensors import CHECK_FAILURE_SENSOR, RUN_FAILURE_SENSOR
from spark_backup.engine.cadence import partition_key_for
from spark_backup.engine.pipeline import utcnow
from spark_backup.errors import PlanError
from spark_backup.notify import Failure, Notifications, TicketDesk
from spark_backup.notify.desk import OUTBOX
from spark_backup.plan import load_plan
from spark_backup.service import BackupService
from spark_backup_tests.helpers import config_source, flip_last_byte, plan_dict, write_plan
from spark_backup_tests.notify_servers import (
    SMTP_PASSWORD,
    SMTP_USER,
    github_server,
    jira_server,
    smtp_server,
    webhook_server,
)

QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
TOKEN = "jira-token-never-shown-7f3a"


def _failure(event: str = "run:1", partition: str = "2026-11-29") -> Failure:
    return Failure("vpn_config", partition, "checksum", event, "copy damaged", "bytes differ")


def _email(port: int, **extra) -> dict:
    return {
        "host": "127.0.0.1",
        "port": port,
        "sender": "spark-backup@example.com",
        "to": ["security@example.com"],
        **extra,
    }


def test_outbox_opens_one_ticket_per_failure_and_comments_on_recurrence(tmp_path: Path) -> None:
    desk = TicketDesk(Notifications(), tmp_path)
    first = desk.report(_failure("run:1"))
    assert (first.action, first.ticket) == ("opened", "OUTBOX-1")
    assert desk.report(_failure("run:1")).action == "duplicate"  # the same event again
    again = desk.report(_failure("run:2"))
    assert (again.action, again.ticket) == ("commented", "OUTBOX-1")
    other = desk.report(_failure("run:3", partition="2026-11-30"))
    assert (other.action, other.ticket) == ("opened", "OUTBOX-2")
    lines = [json.loads(line) for line in (tmp_path / OUTBOX).read_text().splitlines()]
    assert [(e["action"], e["ticket"]) for e in lines] == [
        ("open", "OUTBOX-1"),
        ("comment", "OUTBOX-1"),
        ("open", "OUTBOX-2"),
    ]
    assert desk.tickets()["vpn_config/2026-11-29/checksum"]["occurrences"] == 2


def test_jira_tickets_and_smtp_mail_with_secrets_from_the_environment(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("JIRA_TOKEN", TOKEN)
    monkeypatch.setenv("SMTP_PASSWORD", SMTP_PASSWORD)
    with jira_server(tmp_path) as jira, smtp_server() as mailbox:
        settings = Notifications.model_validate(
            {
                "tickets": {
                    "backend": "jira",
                    "url": jira.url,
                    "project": "JIRA820",
                    "user": "admin",
                    "token_env": "JIRA_TOKEN",
                    "labels": ["spark-backup"],
                },
                "email": _email(mailbox.port, user=SMTP_USER, password_env="SMTP_PASSWORD"),
            }
        )
        desk = TicketDesk(settings, tmp_path / "state")
        opened = desk.report(_failure("run:1"))
        assert opened.action == "opened" and opened.emailed
        commented = desk.report(_failure("run:2"))
        assert commented.action == "commented" and commented.ticket == opened.ticket
        assert not commented.emailed
        (issue,) = jira.issues("spark-backup")
        assert issue["key"] == opened.ticket
        assert issue["fields"]["summary"] == _failure().title()
        comments = jira.get(f"/rest/api/2/issue/{opened.ticket}/comment")["comments"]
        assert len(comments) == 1 and "Recurred" in comments[0]["body"]
        # One mail when the ticket opened; a recurrence is a comment only (unless asked).
        assert len(mailbox.messages) == 1 and mailbox.logins == [(SMTP_USER, SMTP_PASSWORD)]
        assert mailbox.messages[0]["To"] == "security@example.com"
        assert opened.ticket in mailbox.messages[0]["Subject"]
        for message in mailbox.messages:
            assert TOKEN not in message.as_string() and SMTP_PASSWORD not in message.as_string()
        state = (tmp_path / "state" / "ledger.json").read_text()
        assert TOKEN not in state and SMTP_PASSWORD not in state


def test_a_backend_down_queues_says_so_once_and_delivers_later(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HOOK_TOKEN", TOKEN)
    with webhook_server() as hook:
        settings = Notifications.model_validate(
            {"tickets": {"backend": "webhook", "url": hook.url, "token_env": "HOOK_TOKEN"}}
        )
        desk = TicketDesk(settings, tmp_path)
        hook.status = 401  # the receiver refuses the token
        first = desk.report(_failure("run:1"))
        assert first.action == "queued" and first.ticket is None
        assert "HTTP 401" in first.warning and "refused the credentials" in first.warning
        assert TOKEN not in first.warning and "/hook" not in first.warning
        second = desk.report(_failure("run:2", partition="2026-11-30"))
        assert second.action == "queued" and second.warning is None  # said once
        recurred = desk.report(_failure("run:3"))  # waits behind its ticket
        assert recurred.action == "queued"
        assert len(desk.pending()) == 3 and hook.received == []
        hook.status = 200
        delivered = desk.retry()
        assert len(delivered) == 3 and desk.pending() == []
        assert [p["action"] for p in hook.received] == ["open", "open", "comment"]
        assert hook.received[2]["ticket"] == hook.received[0]["title"] or hook.received[2][
            "ticket"
        ].startswith("HOOK-")
        assert hook.headers[0]["Authorization"] == f"Bearer {TOKEN}"
        assert desk.tickets()["vpn_config/2026-11-29/checksum"]["ticket"] == "HOOK-1"


def _github(hub, **extra) -> Notifications:
    return Notifications.model_validate(
        {
            "tickets": {
                "backend": "github",
                "url": hub.url,
                "repository": hub.repository,
                "token_env": "GITHUB_TOKEN",
                "labels": ["spark-backup", "backup-failure"],
                **extra,
            }
        }
    )


def test_github_issues_one_per_failure_commented_on_recurrence(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    with github_server(TOKEN) as hub:
        desk = TicketDesk(_github(hub), tmp_path / "state")
        opened = desk.report(_failure("run:1"))
        assert (opened.action, opened.ticket) == ("opened", "acme/platform#1")
        assert desk.report(_failure("run:1")).action == "duplicate"
        assert desk.report(_failure("run:2")).ticket == "acme/platform#1"
        other = desk.report(_failure("run:3", partition="2026-11-30"))
        assert other.ticket == "acme/platform#2"
        assert [i["title"] for i in hub.issues] == [
            _failure().title(),
            _failure(partition="2026-11-30").title(),
        ]
        assert {label["name"] for label in hub.issues[0]["labels"]} == {
            "spark-backup",
            "backup-failure",
        }
        assert "check: checksum" in hub.issues[0]["body"]
        (comment,) = hub.comments[1]
        assert comment["body"].startswith("Recurred.") and "event: run:2" in comment["body"]
        headers = {name.lower(): value for name, value in hub.requests[0][2].items()}
        assert headers["x-github-api-version"] == "2022-11-28"
        assert headers["accept"] == "application/vnd.github+json"
        state = (tmp_path / "state" / "ledger.json").read_text()
        assert TOKEN not in state


def test_github_dedupes_by_title_when_the_ledger_is_lost(tmp_path: Path, monkeypatch):
    """A fresh state folder (a new machine) finds the open issue by its stable title."""
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    with github_server(TOKEN) as hub:
        # Enough newer open issues that the match (the oldest) is on the second page.
        for n in range(120):
            hub.issues.append(
                {
                    "number": n + 2,
                    "title": f"other {n}",
                    "state": "open",
                    "labels": [{"name": "spark-backup"}, {"name": "backup-failure"}],
                }
            )
        hub.issues.insert(
            0,
            {
                "number": 1,
                "title": _failure().title(),
                "state": "open",
                "labels": [{"name": "spark-backup"}, {"name": "backup-failure"}],
            },
        )
        first = TicketDesk(_github(hub), tmp_path / "one").report(_failure("run:1"))
        assert first.ticket == "acme/platform#1"
        again = TicketDesk(_github(hub), tmp_path / "two").report(_failure("run:2"))
        assert again.ticket == "acme/platform#1"
        assert len(hub.issues) == 121  # nothing new opened
        assert [c["body"].split("\n")[0] for c in hub.comments[1]] == [
            "Recurred (the issue was already open).",
            "Recurred (the issue was already open).",
        ]
        pages = [p for method, p, _ in hub.requests if method == "GET"]
        assert any("page=2" in p for p in pages)
        # A closed issue of the same title is not reopened silently: a new one opens.
        hub.issues[0]["state"] = "closed"
        fresh = TicketDesk(_github(hub), tmp_path / "three").report(_failure("run:3"))
        assert fresh.action == "opened" and fresh.ticket == "acme/platform#122"


def test_github_refusing_the_token_queues_and_says_so_once(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", "wrong-token")
    with github_server(TOKEN) as hub:
        desk = TicketDesk(_github(hub), tmp_path)
        first = desk.report(_failure("run:1"))
        assert first.action == "queued" and "HTTP 401" in first.warning
        assert "refused the credentials" in first.warning and "wrong-token" not in first.warning
        assert desk.report(_failure("run:2", partition="2026-11-30")).warning is None
        assert hub.issues == []
        monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
        assert len(desk.retry()) == 2 and desk.pending() == []
        assert [i["number"] for i in hub.issues] == [1, 2]


def test_an_unreachable_smtp_server_queues_the_mail(tmp_path: Path) -> None:
    with smtp_server() as mailbox:
        port = mailbox.port
    settings = Notifications.model_validate({"email": _email(port, timeout="2s")})
    desk = TicketDesk(settings, tmp_path)
    outcome = desk.report(_failure())
    assert outcome.action == "opened" and not outcome.emailed
    assert "SMTP 127.0.0.1" in outcome.warning
    assert [p["kind"] for p in desk.pending()] == ["email"]


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"tickets": {"backend": "jira", "url": "http://j", "token": "x"}}, "inline secret"),
        ({"tickets": {"backend": "jira", "url": "http://j"}}, "needs project"),
        ({"tickets": {"backend": "webhook"}}, "needs url"),
        ({"tickets": {"backend": "github", "url": "http://g"}}, "needs repository"),
        ({"email": {"sender": "a@b.c", "to": ["d@e.f"], "password": "x"}}, "password_env"),
    ],
)
def test_plan_refuses_inline_secrets_and_incomplete_backends(
    tmp_path: Path, age_key, section, expected
) -> None:
    plan = plan_dict([age_key[1]], [config_source("vpn_config", [str(tmp_path)])])
    plan["notifications"] = section
    with pytest.raises(PlanError, match=expected):
        load_plan(write_plan(tmp_path, plan))


# --- through Dagster: the sensors ----------------------------------------------------------------


@pytest.fixture
def notified_plan(tmp_path: Path, age_key, estate: Path):
    def make(port: int, jira_url: str) -> Path:
        plan = plan_dict(
            [age_key[1]],
            [config_source("vpn_config", [str(estate / "wireguard")], cadence="daily")],
        )
        plan["encryption"]["identity_file"] = str(age_key[0])
        plan["notifications"] = {
            "state_dir": "notifications",
            "tickets": {
                "backend": "jira",
                "url": jira_url,
                "project": "JIRA820",
                "user": "admin",
                "token_env": "JIRA_TOKEN",
                "labels": ["spark-backup-e2e"],
            },
            "email": _email(port),
        }
        return write_plan(tmp_path, plan)

    return make


def test_damaged_copy_gives_one_ticket_and_one_email_through_the_sensor(
    tmp_path: Path, notified_plan, monkeypatch
) -> None:
    monkeypatch.setenv("JIRA_TOKEN", TOKEN)
    with jira_server(tmp_path) as jira, smtp_server() as mailbox:
        plan = notified_plan(mailbox.port, jira.url)
        key = AssetCheckKey(backup_asset_key("vpn_config"), CHECKSUM_CHECK)
        defs = Definitions.merge(
            build_definitions(load_plan(plan)),
            Definitions(jobs=[define_asset_job("checksum_only", AssetSelection.checks(key))]),
        )
        partition = partition_key_for("daily", utcnow())
        sensor = defs.resolve_sensor_def(CHECK_FAILURE_SENSOR)
        with DagsterInstance.ephemeral() as instance:

            def tick(cursor: str | None) -> str | None:
                with build_sensor_context(
                    instance=instance,
                    cursor=cursor,
                    definitions=defs,
                    resources=defs.get_repository_def().get_top_level_resources(),
                ) as context:
                    return sensor.evaluate_tick(context).cursor

            backup = defs.resolve_job_def("daily_backups").execute_in_process(
                instance=instance, partition_key=partition, run_config=QUIET
            )
            assert backup.success
            cursor = tick(None)  # the passing checks: nothing to say
            assert jira.issues("spark-backup-e2e") == [] and mailbox.messages == []

            (ref,) = BackupService.from_path(plan).copies("vpn_config")
            path = Path(ref.store.object_uri(ref.manifest.data_key).removeprefix("file://"))
            path.write_bytes(flip_last_byte(path.read_bytes()))
            rerun = defs.resolve_job_def("checksum_only").execute_in_process(
                instance=instance,
                tags={"dagster/partition": partition},
                run_config=QUIET,
                raise_on_error=False,
            )
            assert not rerun.get_asset_check_evaluations()[0].passed
            cursor = tick(cursor)
            (issue,) = jira.issues("spark-backup-e2e")
            assert CHECKSUM_CHECK in issue["fields"]["summary"]
            assert partition in issue["fields"]["summary"]
            assert len(mailbox.messages) == 1
            assert tick(cursor) == cursor  # nothing new: no second ticket, no second mail
            tick(None)  # even read again from the start, every event was reported already
            assert len(jira.issues("spark-backup-e2e")) == 1 and len(mailbox.messages) == 1


def test_failed_run_opens_a_ticket_through_the_run_failure_sensor(
    tmp_path: Path, notified_plan, estate: Path, monkeypatch
) -> None:
    monkeypatch.setenv("JIRA_TOKEN", TOKEN)
    with jira_server(tmp_path) as jira, smtp_server() as mailbox:
        plan = notified_plan(mailbox.port, jira.url)
        defs = build_definitions(load_plan(plan))
        partition = partition_key_for("daily", utcnow())
        # The protected folder disappears: the backup run fails.
        (estate / "wireguard").rename(tmp_path / "gone")
        with DagsterInstance.ephemeral() as instance:
            result = defs.resolve_job_def("daily_backups").execute_in_process(
                instance=instance, partition_key=partition, run_config=QUIET, raise_on_error=False
            )
            assert not result.success
            run = instance.get_run_by_id(result.run_id)
            assert run.status == DagsterRunStatus.FAILURE
            failure_event = next(
                e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE"
            )
            sensor = defs.resolve_sensor_def(RUN_FAILURE_SENSOR)
            for _ in range(2):  # the same failed run seen twice: one ticket
                with build_run_status_sensor_context(
                    sensor_name=RUN_FAILURE_SENSOR,
                    dagster_instance=instance,
                    dagster_run=run,
                    dagster_event=failure_event,
                    resources=defs.get_repository_def().get_top_level_resources(),
                ) as context:
                    sensor(context.for_run_failure())
        (issue,) = jira.issues("spark-backup-e2e")
        assert "run failed for vpn_config" in issue["fields"]["summary"]
        assert partition in issue["fields"]["summary"]
        assert "wireguard" in issue["fields"]["description"]
        assert len(mailbox.messages) == 1


def test_every_occurrence_mails_each_recurrence(tmp_path: Path) -> None:
    with smtp_server() as mailbox:
        settings = Notifications.model_validate(
            {"email": _email(mailbox.port, every_occurrence=True)}
        )
        desk = TicketDesk(settings, tmp_path)
        assert desk.report(_failure("run:1")).emailed
        again = desk.report(_failure("run:2"))
        assert again.action == "commented" and again.emailed
        assert not desk.report(_failure("run:2")).emailed  # the same event: nothing
        assert len(mailbox.messages) == 2


def test_chat_webhook_tells_the_security_team_and_never_shows_its_url(tmp_path: Path) -> None:
    """A Slack/Teams-compatible incoming webhook gets {"text": ...} when a ticket opens; while
    it is down the message is queued, and the warning does not show the URL's secret path."""
    with webhook_server() as chat:
        secret_url = f"{chat.url}/T000/B000/XXXXsecretXXXX"
        settings = Notifications.model_validate({"chat": {"url": secret_url}})
        desk = TicketDesk(settings, tmp_path)
        chat.status = 503
        down = desk.report(_failure("run:1"))
        assert not down.chatted and "HTTP 503" in down.warning
        assert "XXXXsecretXXXX" not in down.warning and "URL not shown" in down.warning
        assert "XXXXsecretXXXX" not in (tmp_path / "ledger.json").read_text()
        chat.status = 200
        assert desk.retry() == ["chat message about vpn_config/2026-11-29/checksum"]
        (message,) = chat.received
        assert set(message) == {"text"} and "checksum failed for vpn_config" in message["text"]
        desk.report(_failure("run:2"))  # a recurrence: a comment, no chat message
        assert len(chat.received) == 1
