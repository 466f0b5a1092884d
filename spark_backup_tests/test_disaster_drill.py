"""The monthly disaster drill: every critical source's newest copy restored (real PostgreSQL on
127.0.0.1:5432, a configuration archive, an LLM adapter), the service restarted, each step
timed, the total against the plan's RTO, the report journaled; from the service, the command
line and Dagster."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, DagsterInstance

from spark_backup.defs.build import build_definitions
from spark_backup.defs.disaster import (
    DISASTER_ASSET,
    DISASTER_CHECK,
    DISASTER_CRON,
    DISASTER_JOB,
    DISASTER_RTO_CHECK,
)
from spark_backup.errors import PlanError, UsageError
from spark_backup.plan import load_plan
from spark_backup.service import BackupService
from spark_backup_tests.helpers import (
    config_source,
    llm_source,
    make_model_dir,
    plan_dict,
    run_cli,
    write_plan,
)
from spark_backup_tests.test_config_drills import (  # noqa: F401 - fixture
    DEPLOYMENT,
    NAMESPACE,
    _drill_namespaces,
    _gateway,
    _key,
    _tree,
    netns,
)
from spark_backup_tests.test_postgres import (  # noqa: F401 - fixtures
    Archiving,
    archiving,
    dump_plan,
    run_sql,
    sample_db,
)

QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
JOURNAL = "orchestration_journal/backups"
EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples" / JOURNAL


@pytest.fixture(autouse=True)
def chunk_secret(monkeypatch):
    monkeypatch.setenv("SPARK_TEST_CHUNK_KEY", "test-chunk-secret-0123456789abcdef")


@pytest.fixture
def estate_plan(
    dump_plan: Path,  # noqa: F811 - the fixture imported above
    sample_db: str,  # noqa: F811
    estate: Path,
    tmp_path: Path,
) -> dict:
    """The PostgreSQL dump source of ``dump_plan`` plus a VPN configuration archive and an LLM
    adapter, all critical, each with a copy."""
    plan = yaml.safe_load(dump_plan.read_text())
    plan["sources"][0]["critical"] = True
    model = make_model_dir(tmp_path / "adapter", tensors=4)
    plan["sources"] += [
        config_source("vpn_config", [str(estate / "wireguard")], critical=True),
        llm_source("adapter", str(model), critical=True),
    ]
    write_plan(dump_plan.parent, plan)
    service = BackupService.from_path(dump_plan)
    for source in ("pg_main", "vpn_config", "adapter"):
        service.backup(source)
    return plan


def _with_drill(plan_path: Path, plan: dict, **drill) -> BackupService:
    write_plan(plan_path.parent, {**plan, "disaster_drill": drill})
    return BackupService.from_path(plan_path)


def test_the_drill_restores_every_critical_source_restarts_and_journals(
    dump_plan: Path,  # noqa: F811
    estate_plan: dict,
    sample_db: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Restart with its default (the adapter restored: tokenizer loaded, tensors against their
    digests) right after the database; the report names every copy; the source database and
    the staging are untouched or gone."""
    service = _with_drill(
        dump_plan, estate_plan, restart={"service": "adapter", "after": "pg_main"}
    )
    ours = f"SELECT datname FROM pg_database WHERE datname LIKE '{sample_db}%' ORDER BY 1"
    staging = tmp_path / "staging"
    staging.mkdir()
    report = service.disaster_drill(staging_root=staging)
    assert report.passed, report.reasons()
    assert [s.name for s in report.steps] == [
        "restore pg_main",
        "restart adapter (restored and checked)",
        "restore vpn_config",
    ]  # the adapter restored once: by its restart
    database, restart, vpn = report.steps
    assert f"database:{sample_db}: row_counts: " in database.description
    assert {c.manifest.id for c in service.copies("pg_main")} == set(database.copies)
    assert "tensor_digests" in restart.description and "4 tensors" in restart.description
    assert "tokenizer loads" in restart.description
    assert vpn.copies == [service.copies("vpn_config")[0].manifest.id]
    assert report.total_seconds >= sum(s.seconds for s in report.steps) - 0.01
    assert report.within_rto and report.rto_seconds == 7200
    assert run_sql(ours) == [(sample_db,)] and list(staging.iterdir()) == []
    journal = dump_plan.parent / JOURNAL
    (markdown,) = journal.glob("disaster-drill-*.md")
    (document,) = journal.glob("disaster-drill-*.json")
    assert markdown.stem == document.stem
    written = json.loads(document.read_text())
    assert written.pop("journal") == []  # written before the journal's own files
    expected = json.loads(json.dumps(report.to_dict()))
    expected.pop("journal")
    assert written == expected
    example = json.loads(next(EXAMPLES.glob("disaster-drill-*.json")).read_text())
    assert set(example) == set(written) | {"journal"}
    assert set(example["steps"][0]) == set(written["steps"][0])
    assert [Path(p).name for p in report.journal] == [
        markdown.name,
        document.name,
        *(p.name for p in journal.glob("*.jsonl")),
    ]
    text = markdown.read_text()
    assert text.startswith("# Disaster drill: passed") and "| restore pg_main | pg_main |" in text
    entries = [
        json.loads(line) for day in journal.glob("*.jsonl") for line in day.read_text().splitlines()
    ]
    (entry,) = [e for e in entries if e["event"] == "disaster_drill"]
    assert entry["passed"] and entry["summary"] == markdown.name


def test_a_hanging_restart_command_is_timed_out_and_fails_the_drill(
    dump_plan: Path,  # noqa: F811
    estate_plan: dict,
    tmp_path: Path,
) -> None:
    """A restart script whose child hangs: the whole process group is killed at the timeout;
    the drill fails with the reason, from the command line too (exit 3)."""
    marker = tmp_path / "child.pid"
    script = tmp_path / "restart.sh"
    script.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {marker}\nwait\n")
    script.chmod(0o755)
    plan = {**estate_plan, "sources": [estate_plan["sources"][1]]}  # the VPN configuration
    _with_drill(dump_plan, plan, restart={"command": [str(script)], "timeout": "2s"})
    clock = time.monotonic()
    result = run_cli("--plan", str(dump_plan), "disaster-drill", "--json")
    assert time.monotonic() - clock < 60
    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout)
    assert not report["passed"] and report["within_rto"]
    restart = report["steps"][-1]
    assert restart["action"] == "restart_command" and not restart["passed"]
    assert "timed out after 2s and was killed" in restart["description"]
    assert 2 <= restart["seconds"] < 30
    assert any("timed out" in reason for reason in report["reasons"])
    child = int(marker.read_text())
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text()


def test_a_drill_over_the_rto_fails_although_every_step_passed(
    dump_plan: Path,  # noqa: F811
    estate_plan: dict,
) -> None:
    plan = {**estate_plan, "sources": [estate_plan["sources"][1]]}
    service = _with_drill(
        dump_plan, plan, rto="1s", restart={"command": ["sleep", "1.5"], "timeout": "30s"}
    )
    report = service.disaster_drill()
    assert all(step.passed for step in report.steps)
    assert report.steps[-1].description == "restart command 'sleep' succeeded"
    assert report.total_seconds > 1 and not report.within_rto and not report.passed
    assert report.reasons() == [f"total {report.total_seconds:.3f} s exceeds the RTO of 1s"]
    (markdown,) = (dump_plan.parent / JOURNAL).glob("disaster-drill-*.md")
    assert "RTO 1s: EXCEEDED" in markdown.read_text()


def test_a_failing_restart_command_fails_the_drill(dump_plan: Path, estate_plan: dict) -> None:  # noqa: F811
    plan = {**estate_plan, "sources": [estate_plan["sources"][1]]}
    service = _with_drill(dump_plan, plan, restart={"command": ["false"]})
    report = service.disaster_drill()
    assert not report.passed and report.within_rto
    assert report.steps[-1].description == "restart command 'false' failed with exit status 1"


def test_the_job_and_schedule_run_the_drill_with_its_checks(
    dump_plan: Path,  # noqa: F811
    estate_plan: dict,
) -> None:
    plan = {**estate_plan, "sources": [estate_plan["sources"][1], estate_plan["sources"][2]]}
    _with_drill(dump_plan, plan, restart={"service": "adapter"})
    defs = build_definitions(load_plan(dump_plan))
    schedule = defs.resolve_schedule_def(f"{DISASTER_JOB}_schedule")
    assert schedule.cron_schedule == DISASTER_CRON and schedule.job_name == DISASTER_JOB
    graph = defs.resolve_asset_graph()
    assert graph.get(DISASTER_ASSET).parent_keys == {
        AssetKey(["backups", "vpn_config"]),
        AssetKey(["backups", "adapter"]),
    }
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def(DISASTER_JOB).execute_in_process(
            instance=instance, run_config=QUIET
        )
    assert result.success
    (materialization,) = result.asset_materializations_for_node("drills__disaster")
    assert materialization.metadata["passed"].value is True
    assert len(materialization.metadata["steps"].value) == 2
    evaluations = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    assert evaluations[DISASTER_CHECK].passed and evaluations[DISASTER_RTO_CHECK].passed


def test_without_a_critical_source_there_is_no_drill(dump_plan: Path) -> None:  # noqa: F811
    service = BackupService.from_path(dump_plan)
    with pytest.raises(UsageError, match="no source is marked critical"):
        service.disaster_drill()
    graph = build_definitions(load_plan(dump_plan)).resolve_asset_graph()
    assert DISASTER_ASSET not in graph.get_all_asset_keys()


@pytest.mark.parametrize(
    ("restart", "message"),
    [
        ({"service": "nowhere"}, "disaster_drill.restart.service names unknown source 'nowhere'"),
        ({"command": ["true"], "after": "x"}, "restart.after names unknown source 'x'"),
        ({"timeout": "5m"}, "set command, or service"),
    ],
)
def test_a_bad_restart_is_a_plan_error(dump_plan: Path, restart: dict, message: str) -> None:  # noqa: F811
    plan = yaml.safe_load(dump_plan.read_text())
    write_plan(dump_plan.parent, {**plan, "disaster_drill": {"restart": restart}})
    with pytest.raises(PlanError, match=message):
        load_plan(dump_plan)


def test_a_database_with_base_backups_is_recovered_to_the_newest_point(
    archiving: Archiving,  # noqa: F811
) -> None:
    """Real PostgreSQL with WAL archiving: the kind's point-in-time recovery replays every
    archived write after the base backup into a new cluster of the drill's own, which is
    stopped and removed; the restart runs after it."""
    cluster = archiving.cluster
    cluster.execute("CREATE TABLE disaster_probe AS SELECT generate_series(1, 10) AS x")
    [base] = archiving.service.backup("pg_main", artifact="base")
    cluster.execute("INSERT INTO disaster_probe VALUES (11)")
    cluster.switch_wal_and_wait()
    plan = archiving.write_plan(
        "disaster.yaml",
        source={"critical": True},
        disaster_drill={"restart": {"command": ["true"], "after": "pg_main"}},
    )
    # Short: the recovery cluster's Unix socket lives in its folder (at most 107 bytes).
    staging = Path(tempfile.mkdtemp(prefix="sbdd-", dir="/tmp"))
    staging.chmod(0o755)
    try:
        report = BackupService.from_path(plan).disaster_drill(staging_root=staging)
        left = list(staging.iterdir())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    assert report.passed, report.reasons()
    recover, restart = report.steps
    assert recover.action == "recover_to_newest" and recover.copies == [base.id]
    assert recover.details["databases"]["postgres"]["row_counts"]["public.disaster_probe"] == 11
    assert restart.action == "restart_command" and restart.passed
    assert left == []


def test_the_kubernetes_and_vpn_steps_are_the_configuration_drills(
    tmp_path: Path,
    age_key,
    netns,  # noqa: F811
) -> None:
    """The configuration archive's own drills, composed: the manifests validated offline
    against the Kubernetes schemas, the restored WireGuard configuration brought up as a tunnel
    (wireguard-go in two network namespaces) and pinged through; the private key appears nowhere
    in the report."""
    private = _key()
    k8s = _tree(
        tmp_path / "k8s", {"manifests/ns.yaml": NAMESPACE, "manifests/vllm.yaml": DEPLOYMENT}
    )
    vpn = _tree(tmp_path / "vpn", {"wireguard/wg0.conf": _gateway(private)})
    sources = [
        config_source(
            "k8s_config",
            [str(k8s)],
            critical=True,
            drill={"kubernetes": {"manifests": ["manifests/*.yaml"]}},
        ),
        config_source(
            "vpn_config",
            [str(vpn)],
            critical=True,
            drill={"wireguard": {"configs": ["wireguard/*.conf"]}},
        ),
    ]
    plan = plan_dict([age_key[1]], sources, disaster_drill={"restart": {"command": ["true"]}})
    plan["encryption"]["identity_file"] = str(age_key[0])
    service = BackupService.from_path(write_plan(tmp_path, plan))
    for source in ("k8s_config", "vpn_config"):
        service.backup(source)
    report = service.disaster_drill()
    assert report.passed, report.reasons()
    kubernetes, tunnel, restart = report.steps
    assert "3 objects in 2 manifests valid for Kubernetes 1.30.0" in kubernetes.description
    assert "tunnel up, 3 pings answered by 10.8.0.1" in tunnel.description
    assert restart.description == "restart command 'true' succeeded"
    assert _drill_namespaces() == []
    journal = tmp_path / JOURNAL
    written = "".join(p.read_text() for p in journal.glob("disaster-drill-*"))
    assert "tunnel up" in written and private not in written and private[:20] not in written


def test_a_critical_source_without_a_copy_fails_its_step_and_the_others_still_run(
    tmp_path: Path, age_key, estate: Path
) -> None:
    sources = [
        config_source("never_copied", [str(estate / "nvidia")], critical=True),
        config_source("vpn_config", [str(estate / "wireguard")], critical=True),
    ]
    plan = plan_dict([age_key[1]], sources)
    plan["encryption"]["identity_file"] = str(age_key[0])
    service = BackupService.from_path(write_plan(tmp_path, plan))
    service.backup("vpn_config")
    report = service.disaster_drill()
    missing, vpn = report.steps
    assert not missing.passed and missing.copies == []
    assert "no committed copy of never_copied" in missing.description
    assert vpn.passed and not report.passed
    assert report.reasons()[0].startswith("restore never_copied: no committed copy")
