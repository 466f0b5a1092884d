"""The plan: valid plans load into typed models; every mistake is one line naming file and field."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from spark_backup.errors import PlanError
from spark_backup.plan import load_plan, parse_duration
from spark_backup.sources import registry
from spark_backup_tests.helpers import config_source, plan_dict, run_cli, write_plan

RECIPIENT = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"


def _plan(**overrides) -> dict:
    plan = plan_dict([RECIPIENT], [config_source("dgx_config", ["/etc/nvidia"])])
    plan.update(overrides)
    return plan


def test_valid_plan_resolves_defaults(tmp_path: Path) -> None:
    plan = _plan(
        stores=[
            {"name": "local", "kind": "local", "path": "store"},
            {
                "name": "worm",
                "kind": "s3",
                "bucket": "spark-backups",
                "endpoint_url": "http://127.0.0.1:9000",
                "access_key_id_env": "S3_KEY_ID",
                "secret_access_key_env": "S3_SECRET",
                "object_lock": {"mode": "COMPLIANCE", "retain_days": 30},
            },
        ],
    )
    plan["sources"].append(
        config_source(
            "vpn_config",
            ["/etc/wireguard"],
            cadence="daily",
            store="worm",
            max_age="2h",
            rpo="15m",
            rto="1h",
            retention={"daily": 3, "weekly": 1, "monthly": 0},
        )
    )
    loaded = load_plan(write_plan(tmp_path, plan))
    dgx, vpn = loaded.plan.sources
    assert loaded.plan.store_for(dgx).name == "local"
    assert loaded.plan.store_for(vpn).name == "worm"
    assert loaded.plan.retention_for(dgx).model_dump() == {"daily": 7, "weekly": 4, "monthly": 12}
    assert loaded.plan.retention_for(vpn).daily == 3
    assert loaded.plan.max_age_for(dgx) == dt.timedelta(hours=24)
    assert loaded.plan.max_age_for(vpn) == dt.timedelta(hours=2)
    assert vpn.rpo == dt.timedelta(minutes=15)
    assert loaded.resolve("store") == tmp_path / "store"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda p: p["sources"][0].update(kind="rsync"),
            # The registered kinds, whichever they are.
            "sources[0].kind: unknown kind 'rsync' (expected one of: {kinds})",
        ),
        (lambda p: p["sources"][0].pop("paths"), "sources[0].paths: field required"),
        (lambda p: p["sources"][0].pop("cadence"), "sources[0].cadence: field required"),
        (
            lambda p: p["sources"][0].update(cadence="fortnightly"),
            "sources[0].cadence: expected one of: 15min, hourly, daily, weekly, monthly, got "
            "'fortnightly'",
        ),
        (
            lambda p: p["sources"][0].update(rpo="soon"),
            "sources[0].rpo: expected a duration such as 15m, 2h, 7d, got 'soon'",
        ),
        (
            lambda p: p["sources"][0].update(owner="bob"),
            "sources[0].owner: expected an email address or 'team:NAME', got 'bob'",
        ),
        (
            lambda p: p["sources"][0].update(name="DGX-Config"),
            "sources[0].name: String should match pattern",
        ),
        (
            lambda p: p["sources"][0].update(store="nowhere"),
            "sources[0].store names unknown store 'nowhere' (expected one of: local)",
        ),
        (lambda p: p["sources"][0].update(colour="blue"), "sources[0].colour: unknown field"),
        (
            lambda p: p["encryption"].update(recipients=["age1notakey"]),
            "encryption.recipients: expected an age X25519 public key",
        ),
        (
            lambda p: p["encryption"].update(recipients=[]),
            "encryption: expected at least one entry in recipients or recipients_files",
        ),
        (
            lambda p: p["encryption"].update(identity_file="AGE-SECRET-KEY-1QQQ"),
            "encryption.identity_file: expected a path to an identity file; never put a private key here",
        ),
        (
            lambda p: p["stores"].append(
                {"name": "s3", "kind": "s3", "bucket": "b-1", "secret_access_key": "hunter2"}
            ),
            "stores[1].secret_access_key: inline secret is not allowed; write a reference: env:NAME or vault:MOUNT/PATH#FIELD",
        ),
        (
            lambda p: p["stores"].append(
                {"name": "s3", "kind": "s3", "bucket": "b-1", "access_key_id_env": "K"}
            ),
            "stores[1]: set both access_key_id and secret_access_key, or neither",
        ),
        (
            lambda p: p["stores"][0].update(kind="ftp"),
            "stores[0].kind: unknown kind 'ftp' (expected one of: local, s3)",
        ),
        (
            lambda p: p["stores"].append({"name": "local", "kind": "local"}),
            "stores: name 'local' is used twice",
        ),
        (lambda p: p.pop("sources"), "sources: field required"),
        (
            lambda p: p["sources"][0].update(max_age="99999999999w"),
            "sources[0].max_age: expected a duration above 0 and at most 100 years",
        ),
        (
            lambda p: p["sources"][0].update(max_age=float("inf")),
            "sources[0].max_age: expected a duration above 0",
        ),
        (lambda p: p["sources"][0].update(rto=-5), "sources[0].rto: expected a duration above 0"),
        (
            lambda p: p["sources"][0].update(exclude=["[z-a]*"]),
            "sources[0].exclude: invalid glob '[z-a]*'",
        ),
        (
            lambda p: p.update(defaults={"orphan_grace": "0s"}),
            "defaults.orphan_grace: expected a duration above 0",
        ),
        (
            lambda p: p.update(defaults={"orphan_grace": "10m"}),
            "defaults.orphan_grace: expected at least 1h",
        ),
    ],
)
def test_plan_mistakes_name_file_and_field(tmp_path: Path, mutate, expected: str) -> None:
    plan = _plan()
    mutate(plan)
    path = write_plan(tmp_path, plan)
    with pytest.raises(PlanError) as raised:
        load_plan(path)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert expected.replace("{kinds}", ", ".join(sorted(registry.kinds()))) in message
    assert "hunter2" not in message


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text("sources:\n  - name: x\n   kind: [\n")
    with pytest.raises(PlanError, match=rf"^{path}: line \d+, column \d+: invalid YAML"):
        load_plan(path)


def test_missing_plan_names_env_var(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"plan file not found .*SPARK_BACKUP_PLAN"):
        load_plan(tmp_path / "absent.yaml")


def test_plan_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_plan(tmp_path, _plan(), name="elsewhere.yaml")
    monkeypatch.setenv("SPARK_BACKUP_PLAN", str(path))
    assert load_plan().path == path


@pytest.mark.parametrize(
    ("text", "seconds"), [("15m", 900), ("2h", 7200), ("7d", 604800), ("1w", 604800), (90, 90)]
)
def test_durations(text, seconds) -> None:
    assert parse_duration(text).total_seconds() == seconds


def test_plan_check_cli(tmp_path: Path) -> None:
    good = write_plan(tmp_path, _plan())
    result = run_cli("--plan", str(good), "plan", "check")
    assert result.returncode == 0, result.stderr
    assert "plan is valid" in result.stdout and "dgx_config" in result.stdout

    bad = _plan()
    bad["sources"][0]["kind"] = "rsync"
    result = run_cli("--plan", str(write_plan(tmp_path, bad, "bad.yaml")), "plan", "check")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "bad.yaml: sources[0].kind: unknown kind 'rsync'" in result.stderr


def test_plan_check_probe_reports_missing_source_path(tmp_path: Path) -> None:
    plan = plan_dict([RECIPIENT], [config_source("dgx_config", [str(tmp_path / "missing")])])
    result = run_cli("--plan", str(write_plan(tmp_path, plan)), "plan", "check", "--probe")
    assert result.returncode == 6
    assert f"source 'dgx_config': path {tmp_path / 'missing'} does not exist" in result.stderr


def test_unreachable_store_is_one_line(tmp_path: Path) -> None:
    plan = _plan(
        stores=[
            {
                "name": "offsite",
                "kind": "s3",
                "bucket": "spark-backups",
                "endpoint_url": "http://127.0.0.1:9",
                "max_attempts": 1,
            }
        ]
    )
    result = run_cli(
        "--plan",
        str(write_plan(tmp_path, plan)),
        "plan",
        "check",
        "--probe",
        env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
    )
    assert result.returncode == 5, result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "offsite" in result.stderr and "127.0.0.1:9" in result.stderr


def test_example_plan_in_docs_is_valid(tmp_path: Path) -> None:
    """The demo plan shipped with the package is a valid plan."""
    from importlib import resources

    text = resources.files("spark_backup").joinpath("demo_data/spark_backup.yaml").read_text()
    data = yaml.safe_load(text)
    data["encryption"] = {"recipients": [RECIPIENT]}
    load_plan(write_plan(tmp_path, data))


def test_every_error_is_shown_unknown_fields_first_with_a_hint(tmp_path: Path) -> None:
    """A misspelled key shows as what it is, with the field it was meant to be, before the
    "field required" it causes; every other error follows in the same line."""
    plan = _plan()
    source = plan["sources"][0]
    source["cadance"] = source.pop("cadence")
    source["exclude"] = ["[z-a]*"]
    plan["stores"][0]["pth"] = "store"
    with pytest.raises(PlanError) as raised:
        load_plan(write_plan(tmp_path, plan))
    message = str(raised.value)
    assert "\n" not in message
    unknown = "sources[0].cadance: unknown field (did you mean 'cadence'?)"
    assert unknown in message and "stores[0].pth: unknown field (did you mean 'path'?)" in message
    assert message.index(unknown) < message.index("sources[0].cadence: field required")
    assert "sources[0].exclude: invalid glob '[z-a]*'" in message
    assert "(and " not in message


def test_a_misspelled_kind_gets_a_hint(tmp_path: Path) -> None:
    plan = _plan()
    plan["sources"][0]["kind"] = "config_archiv"
    with pytest.raises(
        PlanError, match=r"unknown kind 'config_archiv' .*did you mean 'config_archive'"
    ):
        load_plan(write_plan(tmp_path, plan))


def test_every_section_default_made_without_validation_equals_the_validated_one() -> None:
    """Section defaults are ``model_construct``ed (no validator built at import): each must be
    exactly what validating the model's defaults gives, nested sections included."""
    import spark_backup.plan.schema  # noqa: F401 - defines the plan's sections
    from spark_backup.engine.settings import SettingsModel

    assert registry.kinds()  # every kind loaded: its settings models defined

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    checked = set()
    for model in set(subclasses(SettingsModel)):
        for name, field in model.model_fields.items():
            default = field.default
            if isinstance(default, SettingsModel):
                where = f"{model.__qualname__}.{name}"
                assert default == type(default)(), where
                assert type(default).model_validate(default.model_dump()) == default, where
                checked.add(where)
    assert len(checked) >= 14, sorted(checked)
