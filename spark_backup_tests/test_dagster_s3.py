"""S3 stores in Dagster runs: their clients come from dagster-aws ``S3Resource``s built from
the plan's store entries and the platform's own resources, against a real S3 server
(SeaweedFS); the plan and a resource that contradict each other are refused in one line."""

from __future__ import annotations

import datetime as dt
import textwrap
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, EnvVar
from dagster_aws.s3 import S3Resource

from spark_backup.defs.build import build_definitions
from spark_backup.defs.resources import (
    S3_RESOURCES_ENV,
    STORES_RESOURCE_KEY,
    s3_store_resources,
)
from spark_backup.defs.schedules import backup_job_name
from spark_backup.engine.cadence import partition_key_for
from spark_backup.errors import PlanError
from spark_backup.plan import load_plan
from spark_backup_tests.helpers import config_source, plan_dict, run_cli, write_plan

KEY_ENV = "SB_TEST_DAGSTER_S3_KEY"
SECRET_ENV = "SB_TEST_DAGSTER_S3_SECRET"
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
# What the platform's own code location would hold: filled in by the test that needs it.
PLATFORM_S3: dict[str, S3Resource] = {}


def _plan(tmp_path: Path, public: str, estate: Path, **store: Any) -> Path:
    entry = {"name": "offsite", "kind": "s3", "bucket": "plan-bucket", "prefix": "spark", **store}
    source = config_source("vpn_config", [str(estate)])
    return write_plan(tmp_path, plan_dict([public], [source], stores=[entry]))


def test_a_run_gets_its_s3_client_from_the_platforms_resource(
    tmp_path, seaweedfs, s3_bucket, age_key, estate, monkeypatch
) -> None:
    """The plan names bucket and prefix only; the endpoint, region and EnvVar credentials are
    the platform's S3Resource's: a run reaches the server only through that resource."""
    monkeypatch.setenv(KEY_ENV, seaweedfs.access_key)
    monkeypatch.setenv(SECRET_ENV, seaweedfs.secret_key)
    monkeypatch.setitem(
        PLATFORM_S3,
        "offsite",
        S3Resource(
            endpoint_url=seaweedfs.endpoint_url,
            region_name=seaweedfs.region,
            aws_access_key_id=EnvVar(KEY_ENV),
            aws_secret_access_key=EnvVar(SECRET_ENV),
            max_attempts=1,
        ),
    )
    monkeypatch.setenv(S3_RESOURCES_ENV, f"{__name__}:PLATFORM_S3")
    plan = _plan(tmp_path, age_key[1], estate, bucket=s3_bucket)
    defs = build_definitions(load_plan(plan))
    resource = defs.resources[STORES_RESOURCE_KEY]
    (store,) = resource.s3_stores
    assert (store.store, store.endpoint_url, store.aws_access_key_id.env_var_name) == (
        "offsite",
        seaweedfs.endpoint_url,
        KEY_ENV,
    )
    partition = partition_key_for("weekly", dt.datetime.now(dt.UTC))
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def(backup_job_name("weekly")).execute_in_process(
            instance=instance, partition_key=partition, run_config=QUIET
        )
    assert result.success
    (materialization,) = result.asset_materializations_for_node("backups__vpn_config")
    assert materialization.metadata["uri"].value.startswith(f"s3://{s3_bucket}/spark/")
    listed = seaweedfs.client().list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert any(o["Key"].startswith("spark/vpn_config/manifests/") for o in listed)
    # EnvVar credentials are resolved in the run, never written into what it records.
    assert seaweedfs.secret_key not in str(materialization.metadata)


def test_the_plans_session_fields_become_the_resource(tmp_path, age_key, estate) -> None:
    plan = _plan(
        tmp_path,
        age_key[1],
        estate,
        endpoint_url="http://127.0.0.1:1",
        region_name="eu-central-1",
        profile_name="backup",
        access_key_id_env=KEY_ENV,
        secret_access_key_env=SECRET_ENV,
        max_attempts=3,
    )
    (store,) = s3_store_resources(load_plan(plan).plan)
    assert (store.endpoint_url, store.region_name, store.profile_name, store.max_attempts) == (
        "http://127.0.0.1:1",
        "eu-central-1",
        "backup",
        3,
    )
    assert (
        isinstance(store.aws_access_key_id, EnvVar)
        and store.aws_access_key_id.env_var_name == KEY_ENV
    )
    # The platform's resource may add what the plan leaves unset, and repeat what it sets.
    platform = {
        "offsite": S3Resource(
            endpoint_url="http://127.0.0.1:1",
            aws_access_key_id=EnvVar(KEY_ENV),
            aws_session_token=EnvVar("SB_TEST_TOKEN"),
        )
    }
    (merged,) = s3_store_resources(load_plan(plan).plan, platform)
    assert merged.aws_session_token.env_var_name == "SB_TEST_TOKEN"
    assert merged.region_name == "eu-central-1"


@pytest.mark.parametrize(
    ("platform", "expected"),
    [
        (
            {"offsite": S3Resource(endpoint_url="http://10.0.0.9:9000")},
            "store 'offsite': endpoint_url is 'http://127.0.0.1:1' in the plan but "
            "'http://10.0.0.9:9000' in its S3Resource",
        ),
        (
            {"offsite": S3Resource(region_name="us-west-2")},
            "region_name is 'eu-central-1' in the plan but 'us-west-2'",
        ),
        (
            {"offsite": S3Resource(aws_access_key_id=EnvVar("OTHER_KEY"))},
            "aws_access_key_id comes from access_key_id env:SB_TEST_DAGSTER_S3_KEY in the plan "
            "but from EnvVar('OTHER_KEY')",
        ),
        (
            {"offsite": S3Resource(aws_secret_access_key="literal-Secret-99")},
            "aws_secret_access_key comes from secret_access_key env:SB_TEST_DAGSTER_S3_SECRET "
            "in the plan but from a literal",
        ),
        (
            {"elsewhere": S3Resource()},
            "'elsewhere' is not an S3 store of the plan (S3 stores: offsite)",
        ),
    ],
)
def test_a_contradiction_is_refused_in_one_line(
    tmp_path, age_key, estate, platform, expected
) -> None:
    plan = _plan(
        tmp_path,
        age_key[1],
        estate,
        endpoint_url="http://127.0.0.1:1",
        region_name="eu-central-1",
        access_key_id_env=KEY_ENV,
        secret_access_key_env=SECRET_ENV,
    )
    with pytest.raises(PlanError) as refused:
        build_definitions(load_plan(plan), platform)
    message = str(refused.value)
    assert expected in message and "\n" not in message
    assert "literal-Secret-99" not in message


def test_plan_check_refuses_a_platform_resource_that_contradicts_the_plan(
    tmp_path, age_key, estate
) -> None:
    (tmp_path / "platform_resources.py").write_text(
        textwrap.dedent(
            """
            from dagster_aws.s3 import S3Resource

            S3 = {"offsite": S3Resource(endpoint_url="http://10.0.0.9:9000")}
            """
        )
    )
    plan = _plan(tmp_path, age_key[1], estate, endpoint_url="http://127.0.0.1:1")
    env = {"PYTHONPATH": str(tmp_path), S3_RESOURCES_ENV: "platform_resources:S3"}
    result = run_cli("--plan", str(plan), "plan", "check", env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: store 'offsite': endpoint_url is 'http://127.0.0.1:1' in the plan but "
        f"'http://10.0.0.9:9000' in its S3Resource ({S3_RESOURCES_ENV}); set it in one place"
    ]
    agreeing = {"PYTHONPATH": str(tmp_path), S3_RESOURCES_ENV: "platform_resources:NOPE"}
    missing = run_cli("--plan", str(plan), "plan", "check", env=agreeing)
    assert missing.returncode == 2 and "cannot load 'platform_resources:NOPE'" in missing.stderr
    assert run_cli("--plan", str(plan), "plan", "check").returncode == 0
