"""deploy/ checked offline: the instance config Dagster would load, the systemd units as
systemd parses them, the Helm values' Kubernetes parts against Kubernetes' own schemas, the
Secrets they name, and the Dockerfile against the project's pins. (No cluster, no image build
here: docs/deploy.md says what only a cluster shows.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config

from spark_backup.defs.build import build_definitions
from spark_backup.defs.instance import (
    install_postgres_config,
    packaged_config,
    postgres_instance_config,
)
from spark_backup.defs.schedules import BACKUP_RUN_RETRIES, backup_job_name
from spark_backup.errors import UsageError
from spark_backup.plan import load_plan
from spark_backup_tests.helpers import (
    config_source,
    free_port,
    make_key,
    plan_dict,
    run_cli,
    write_plan,
)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
VALUES = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())
K8S_VERSION = "1.30"


def _manifests() -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / "helm" / "secrets.example.yaml").read_text()))


# --- the instance config ------------------------------------------------------------------------


def test_deploy_dagster_yaml_is_the_packaged_postgres_config_and_valid() -> None:
    assert (DEPLOY / "dagster.yaml").read_text() == packaged_config(
        "dagster_postgres.yaml"
    ).read_text()
    config, _ = dagster_instance_config(str(DEPLOY))  # raises on anything Dagster refuses
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["storage"]["postgres"]["postgres_db"]["password"] == {
        "env": "DAGSTER_PG_PASSWORD"
    }
    assert config["run_monitoring"]["enabled"] and config["run_retries"]["enabled"]
    assert config["concurrency"]["pools"] == {"default_limit": 1, "granularity": "run"}


def test_dagster_init_postgres_writes_the_server_in_and_keeps_the_password_out(
    tmp_path: Path,
) -> None:
    text = postgres_instance_config(
        "postgresql://backup%40ops@db.internal:6432/dagster_prod?sslmode=require"
    )
    (tmp_path / "dagster.yaml").write_text(text)
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["storage"]["postgres"]["postgres_db"] == {
        "hostname": "db.internal",
        "port": 6432,
        "username": "backup@ops",
        "password": {"env": "DAGSTER_PG_PASSWORD"},
        "db_name": "dagster_prod",
        "scheme": "postgresql+psycopg2",
        "params": {"sslmode": "require"},
    }
    assert "# Runs wait in a queue" in text  # the comments are kept


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://u:secret@db/dagster", "leave the password out of the URL"),
        ("mysql://u@db/dagster", "not a PostgreSQL URL"),
        ("postgresql://u@db", "give user, host and database"),
        ("postgresql://u@db:port/dagster", "the port is not a number"),
    ],
)
def test_dagster_init_postgres_refuses_bad_urls(url: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as raised:
        postgres_instance_config(url)
    assert "secret" not in str(raised.value)


def test_backup_jobs_ask_for_run_retries_and_check_jobs_do_not(tmp_path: Path) -> None:
    _, public = make_key(tmp_path)
    plan = plan_dict([public], [config_source("etc", [str(tmp_path)], cadence="daily")])
    defs = build_definitions(load_plan(write_plan(tmp_path, plan)))
    backup = defs.resolve_job_def(backup_job_name("daily"))
    assert backup.tags["dagster/max_retries"] == str(BACKUP_RUN_RETRIES)
    assert backup.tags["dagster/retry_strategy"] == "FROM_FAILURE"
    # deploy/dagster.yaml retries a failed step only where the job asks.
    assert backup.tags["dagster/retry_on_asset_or_op_failure"] == "true"
    others = [j for j in defs.resolve_all_job_defs() if j.name != backup.name]
    assert others and not any("dagster/max_retries" in j.tags for j in others)


# --- systemd ------------------------------------------------------------------------------------


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as systemd reads it: sections of keys, each possibly given several times."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, value = line.split("=", 1)
        assert current is not None, f"{path.name}: {key} outside a section"
        current.setdefault(key, []).append(value)
    return sections


def test_systemd_units_verify_and_restart(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on the units, with ExecStart pointing at this venv (it checks
    that the programs exist): no unknown key, no bad value. Each service restarts on failure."""
    verify = shutil.which("systemd-analyze")
    assert verify, "systemd-analyze (Debian's systemd) is needed to check the units"
    assert {u.name for u in UNITS} == {
        "dagster-daemon.service",
        "dagster-webserver.service",
        "spark-backup-code-server.service",
    }
    venv_bin = f"{Path(sys.executable).parent}/"
    for unit in UNITS:
        text = unit.read_text().replace("/opt/spark-backup/.venv/bin/", venv_bin)
        # Missing environment files are what verify would report on this machine; keep them
        # required in the shipped units, optional here.
        text = text.replace("EnvironmentFile=/", "EnvironmentFile=-/")
        (tmp_path / unit.name).write_text(text)
    result = subprocess.run(
        [verify, "verify", "--man=no", *sorted(str(p) for p in tmp_path.glob("*.service"))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    for unit in UNITS:
        service = _unit(unit)["Service"]
        assert service["Restart"] == ["always"], unit.name
        assert service["User"] == ["spark-backup"], unit.name
        assert "/etc/spark-backup/secrets.env" in service["EnvironmentFile"], unit.name


def test_units_and_workspace_agree_on_the_code_server() -> None:
    workspace = yaml.safe_load((DEPLOY / "workspace.yaml").read_text())
    (server,) = [entry["grpc_server"] for entry in workspace["load_from"]]
    code_server = _unit(DEPLOY / "systemd" / "spark-backup-code-server.service")
    command = code_server["Service"]["ExecStart"][0].split()
    assert command[command.index("-p") + 1] == str(server["port"])
    assert command[command.index("--location-name") + 1] == server["location_name"]
    module = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["dagster"]
    assert command[command.index("-m") + 1] == module["module_name"]
    for name in ("dagster-daemon.service", "dagster-webserver.service"):
        command = _unit(DEPLOY / "systemd" / name)["Service"]["ExecStart"][0]
        assert "-w /etc/spark-backup/workspace.yaml" in command, name


# --- Helm ---------------------------------------------------------------------------------------


def _validate(manifest: dict) -> None:
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_run_pod_config_is_valid_kubernetes() -> None:
    """What the run launcher merges into every run's Job and pod, as Kubernetes objects."""
    launcher = VALUES["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher"
    config = launcher["config"]["k8sRunLauncher"]["runK8sConfig"]
    container = {"name": "dagster", "image": "spark-backup:test", **config["containerConfig"]}
    pod_spec = {**config["podSpecConfig"], "containers": [container], "restartPolicy": "Never"}
    _validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "run"}, "spec": pod_spec})
    _validate(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "run"},
            "spec": {**config["jobSpecConfig"], "template": {"spec": pod_spec}},
        }
    )
    requests = container["resources"]["requests"]
    assert {"cpu", "memory"} <= requests.keys()
    for deployment in VALUES["dagster-user-deployments"]["deployments"]:
        _validate(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": deployment["name"]},
                "spec": {
                    "volumes": deployment["volumes"],
                    "containers": [
                        {
                            "name": "user-code",
                            "image": "spark-backup:test",
                            "env": deployment["env"],
                            "volumeMounts": deployment["volumeMounts"],
                            "resources": deployment["resources"],
                        }
                    ],
                },
            }
        )


def _rendered_like_the_chart() -> list[dict]:
    """The pods the chart renders from values.yaml, reduced to what uses Secrets: the user code
    Deployment (envFrom its envSecrets, the PostgreSQL password as DAGSTER_PG_PASSWORD from the
    global Secret) and a run's Job (envFrom the launcher's envSecrets)."""
    password = {
        "name": "DAGSTER_PG_PASSWORD",
        "valueFrom": {
            "secretKeyRef": {
                "name": VALUES["global"]["postgresqlSecretName"],
                "key": "postgresql-password",
            }
        },
    }
    launcher = VALUES["runLauncher"]["config"]["k8sRunLauncher"]
    rendered = []
    for deployment in VALUES["dagster-user-deployments"]["deployments"]:
        container = {
            "name": deployment["name"],
            "image": "spark-backup:test",
            "env": [password, *deployment["env"]],
            "envFrom": [{"secretRef": s} for s in deployment["envSecrets"]],
        }
        rendered.append(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": deployment["name"]},
                "spec": {
                    "selector": {"matchLabels": {"app": "user-code"}},
                    "template": {
                        "metadata": {"labels": {"app": "user-code"}},
                        "spec": {"containers": [container], "volumes": deployment["volumes"]},
                    },
                },
            }
        )
    run_container = {
        "name": "dagster",
        "image": "spark-backup:test",
        "env": [password],
        "envFrom": [{"secretRef": s} for s in launcher["envSecrets"]],
    }
    rendered.append(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "dagster-run-0000"},
            "spec": {
                "template": {"spec": {"containers": [run_container], "restartPolicy": "Never"}}
            },
        }
    )
    for manifest in rendered:
        _validate(manifest)
    return rendered


CHECK_SECRETS = DEPLOY / "helm" / "check_secrets.py"


def _check_secrets(rendered: list[dict], defined: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHECK_SECRETS), "--defined", str(defined)],
        input=yaml.safe_dump_all(rendered),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_example_secrets_are_valid_and_every_secret_used_is_defined(tmp_path: Path) -> None:
    """deploy/helm/check_secrets.py, as an operator runs it on `helm template`'s output: with
    secrets.example.yaml everything the pods use is there; without one, it is named."""
    manifests = _manifests()
    for manifest in manifests:
        _validate(manifest)
    rendered = _rendered_like_the_chart()
    result = _check_secrets(rendered, DEPLOY / "helm" / "secrets.example.yaml")
    assert result.returncode == 0, result.stderr
    postgres_secret = next(
        m for m in manifests if m["metadata"]["name"] == VALUES["global"]["postgresqlSecretName"]
    )
    assert "postgresql-password" in postgres_secret["stringData"]  # the key the chart reads
    config_maps = {m["metadata"]["name"] for m in manifests if m["kind"] == "ConfigMap"}
    for deployment in VALUES["dagster-user-deployments"]["deployments"]:
        assert {v["configMap"]["name"] for v in deployment["volumes"]} <= config_maps

    without_store = [
        m for m in manifests if m["metadata"]["name"] != "spark-backup-store-credentials"
    ]
    partial = tmp_path / "secrets.yaml"
    partial.write_text(yaml.safe_dump_all(without_store))
    result = _check_secrets(rendered, partial)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "Secret 'spark-backup-store-credentials' is missing; "
        "used by Deployment/spark-backup, Job/dagster-run-0000"
    )


def test_helm_values_match_the_instance_config() -> None:
    """The cluster's instance (rendered by the chart from these values) and deploy/dagster.yaml
    make the same promises: pools, retries, monitoring, the psycopg2 scheme."""
    instance = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    daemon = VALUES["dagsterDaemon"]
    assert daemon["runCoordinator"]["type"] == "QueuedRunCoordinator"
    queued = daemon["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert (
        queued["dequeueUseThreads"] == instance["run_coordinator"]["config"]["dequeue_use_threads"]
    )
    assert VALUES["concurrency"]["pools"] == {
        "defaultLimit": instance["concurrency"]["pools"]["default_limit"],
        "granularity": instance["concurrency"]["pools"]["granularity"],
    }
    monitoring = instance["run_monitoring"]
    assert daemon["runMonitoring"]["startTimeoutSeconds"] == monitoring["start_timeout_seconds"]
    assert daemon["runMonitoring"]["maxResumeRunAttempts"] == 0
    retries = instance["run_retries"]
    assert daemon["runRetries"] == {
        "enabled": retries["enabled"],
        "maxRetries": retries["max_retries"],
        "retryOnAssetOrOpFailure": retries["retry_on_asset_or_op_failure"],
    }
    assert VALUES["postgresql"]["enabled"] is False
    assert VALUES["generatePostgresqlPasswordSecret"] is False
    assert (
        VALUES["postgresql"]["postgresqlScheme"]
        == instance["storage"]["postgres"]["postgres_db"]["scheme"]
    )


# --- the user code image ------------------------------------------------------------------------


def test_dockerfile_installs_the_project_at_its_pins() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (postgres_pin,) = pyproject["project"]["optional-dependencies"]["postgres"]
    version = postgres_pin.split("==")[1]
    assert f"'dagster-k8s=={version}'" in dockerfile  # same release family as dagster-postgres
    assert "'.[postgres]'" in dockerfile
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which is not there"
    cmd = yaml.safe_load(re.search(r"^CMD (.+)$", dockerfile, re.MULTILINE).group(1))
    assert cmd[cmd.index("-m") + 1] == pyproject["tool"]["dagster"]["module_name"]
    deployment = VALUES["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", pyproject["tool"]["dagster"]["module_name"]]
    assert (
        f"uid {VALUES['runLauncher']['config']['k8sRunLauncher']['runK8sConfig']['podSpecConfig']['securityContext']['runAsUser']}"
        in dockerfile
    )


def test_dagster_init_postgres_says_when_the_database_cannot_be_reached(tmp_path: Path) -> None:
    """One line naming the instance config and the server's refusal, exit status 2, and the
    password nowhere in what it prints."""
    _, public = make_key(tmp_path)
    plan = write_plan(tmp_path, plan_dict([public], [config_source("etc", [str(tmp_path)])]))
    password = "s3cret-never-printed"
    env = {
        "DAGSTER_HOME": str(tmp_path / "home"),
        "SPARK_BACKUP_PLAN": str(plan),
        "DAGSTER_PG_PASSWORD": password,
    }
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/dagster"
    result = run_cli("dagster-init", "--postgres", url, env=env)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / 'home' / 'dagster.yaml'}: the instance storage")
    assert "Connection refused" in last
    assert password not in result.stdout + result.stderr


def test_dagster_init_postgres_never_replaces_another_instance_config(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    sqlite = packaged_config("dagster.yaml").read_text()
    (home / "dagster.yaml").write_text(sqlite)
    with pytest.raises(UsageError, match="an instance config is there already and differs"):
        install_postgres_config(home, "postgresql://u@db/dagster")
    assert (home / "dagster.yaml").read_text() == sqlite
