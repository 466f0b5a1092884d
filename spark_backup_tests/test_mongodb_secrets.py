"""A mongodb source's password: a secret reference (``env:`` or ``vault:``, read through the
plan's resolver), the older ``password_env`` still loading with a one-line deprecation, and a
wrong password failing in one line that never holds it.

The wrong password is tested at the wire level against ``mockupdb`` (SIMULATED: a scripted
server that refuses every SASL start with MongoDB's code 18, as mongod does for a wrong
password or user): nx-27017, the simulated server the other MongoDB tests use, has no
authentication at all (a user in the URI breaks pymongo's SASL handshake with a KeyError, not
a refusal). A real ``mongod`` with ``--auth`` must confirm the same message.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import mockupdb
import pytest

from spark_backup.engine.secrets import SecretRef
from spark_backup.errors import PlanError, SourceError
from spark_backup.plan import load_plan
from spark_backup.service import BackupService
from spark_backup.sources.mongodb.server import AUTHENTICATION_FAILED, password_of
from spark_backup_tests.helpers import mongodb_source, plan_dict, run_cli, write_plan
from spark_backup_tests.openbao import OpenBao
from spark_backup_tests.test_mongodb_oplog import HELLO

SECRET = "wr0ng-pa55-never-shown"
TOKEN_ENV = "SB_TEST_MONGO_BAO_TOKEN"


class SaslRefused:
    """Every ``saslStart`` refused as mongod refuses a wrong password; counts the attempts and
    keeps the user names pymongo authenticated as (the SCRAM client-first message)."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def handle(self, request) -> bool:
        if not (request.is_command and request.command_name == "saslStart"):
            return False
        payload = bytes(request.doc["payload"]).decode()  # n,,n=USER,r=NONCE
        self.attempts.append(dict(p.split("=", 1) for p in payload.split(",")[2:])["n"])
        return request.command_err(code=AUTHENTICATION_FAILED, errmsg="Authentication failed.")


@pytest.fixture
def refusing() -> Iterator[tuple[mockupdb.MockupDB, SaslRefused]]:
    server = mockupdb.MockupDB(auto_ismaster=False, max_wire_version=21)
    refused = SaslRefused()
    server.autoresponds("ismaster", **HELLO)
    server.autoresponds("hello", **HELLO)
    server.autoresponds("endSessions")
    server.autoresponds(refused.handle)
    server.run()
    yield server, refused
    server.stop()


@pytest.mark.parametrize("where", ["env", "vault"])
def test_a_wrong_password_fails_in_one_line_without_the_password(
    tmp_path: Path, age_key, refusing, where: str, request: pytest.FixtureRequest
) -> None:
    server, refused = refusing
    uri = f"mongodb://backup@127.0.0.1:{server.port}/?directConnection=true&authSource=admin"
    env = {"DOCS_PASSWORD": SECRET}
    plan_extra: dict = {}
    reference = "env:DOCS_PASSWORD"
    if where == "vault":
        openbao: OpenBao = request.getfixturevalue("openbao")
        openbao.put("spark/docs", password=SECRET)
        reference = "vault:secret/spark/docs#password"
        env = {TOKEN_ENV: openbao.root_token}
        plan_extra = {"secrets": {"vault": {"address": openbao.address, "token_env": TOKEN_ENV}}}
    source = mongodb_source(uri, ["shop"], connect_timeout="3s", password=reference)
    plan = write_plan(tmp_path, plan_dict([age_key[1]], [source], **plan_extra))

    result = run_cli("--plan", str(plan), "backup", "docs", env=env)
    assert result.returncode == SourceError.exit_code, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "source 'docs' (127.0.0.1:" in line and "authentication failed" in line, line
    assert reference in line  # where to look: the reference, never the value
    assert SECRET not in result.stderr + result.stdout
    assert refused.attempts and set(refused.attempts) == {"backup"}
    assert BackupService.from_path(plan).copies("docs") == []


def test_password_env_still_loads_as_an_env_reference_with_one_deprecation_line(
    tmp_path: Path, age_key, monkeypatch, caplog: pytest.LogCaptureFixture
) -> None:
    source = mongodb_source("mongodb://backup@db1:27017/", ["shop"], password_env="DOCS_PW")
    plan = write_plan(tmp_path, plan_dict([age_key[1]], [source]))
    with caplog.at_level(logging.WARNING):
        (loaded,) = load_plan(plan).plan.sources
    assert loaded.password == SecretRef.env("DOCS_PW")
    (record,) = [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert record.getMessage() == (
        "source 'docs': password_env is deprecated; write 'password: env:DOCS_PW' instead"
    )
    monkeypatch.setenv("DOCS_PW", SECRET)
    assert password_of(loaded) == SECRET
    # On the command line: the plan works, and the warning is one line of stderr.
    result = run_cli("--plan", str(plan), "plan", "check", env={"DOCS_PW": SECRET})
    assert result.returncode == 0, result.stderr
    deprecations = [line for line in result.stderr.splitlines() if "deprecated" in line]
    assert deprecations == [record.getMessage()], result.stderr


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"password": "hunter2"}, "inline secret is not allowed"),
        ({"password": "env:X", "password_env": "Y"}, "set password or password_env, not both"),
        ({"password_env": "not a name"}, "password_env: expected an environment variable name"),
        ({"password": "vault:kv"}, "expected vault:MOUNT/PATH#FIELD"),
    ],
)
def test_password_mistakes_are_one_line_plan_errors(
    tmp_path: Path, age_key, change: dict, expected: str
) -> None:
    source = {**mongodb_source("mongodb://backup@db1:27017/", ["shop"]), **change}
    plan = write_plan(tmp_path, plan_dict([age_key[1]], [source]))
    with pytest.raises(PlanError, match=re.escape(expected)) as raised:
        load_plan(plan)
    assert "hunter2" not in str(raised.value) and "\n" not in str(raised.value)
