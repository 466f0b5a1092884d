"""``spark-backup demo``, the README's first command, end to end in a fresh home."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from dagster import AssetCheckKey, AssetKey, DagsterInstance

from spark_backup_tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("dgx_config", "k8s_config", "vpn_config")


def test_demo_backs_up_verifies_restores_and_records_in_dagster(
    tmp_path: Path, monkeypatch
) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "SPARK_BACKUP_PLAN")}
    result = run_cli("demo", "--home", str(home), cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo complete" in result.stdout
    assert "Opened" in result.stdout and "with standard tools" in result.stdout
    # The drill_new_copies sensor drilled every source's new copy; the KPIs are printed.
    for source in SOURCES:
        assert re.search(rf"{source}: passed .* restore [0-9.]+ s of RTO", result.stdout), source
    assert "last drill" in result.stdout and "restore / RTO" in result.stdout
    assert f"DAGSTER_HOME={home / 'dagster_home'}" in result.stdout
    # The next steps on the command line name the plan, so `list` finds it.
    assert f"export SPARK_BACKUP_PLAN={home / 'demo' / 'spark_backup.yaml'}" in result.stdout
    assert (home / "dagster_home" / "dagster.yaml").read_text() == (
        ROOT / "spark_backup" / "defs" / "dagster.yaml"
    ).read_text()
    assert oct((home / "keys" / "demo-age.key").stat().st_mode & 0o777) == "0o600"

    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster_home"))
    with DagsterInstance.get() as instance:
        for source in SOURCES:
            # The protected system was observed: the UI shows when it changes after its copy.
            observed = instance.get_latest_data_version_record(AssetKey(["systems", source]))
            assert observed is not None, source
            key = AssetKey(["backups", source])
            event = instance.get_latest_materialization_event(key)
            assert event is not None, source
            metadata = event.asset_materialization.metadata
            assert metadata["bytes"].value > 0
            drilled = instance.get_latest_materialization_event(AssetKey(["drills", source]))
            assert drilled is not None and drilled.asset_materialization.metadata["passed"].value
            for check in ("checksum", "freshness"):
                record = instance.event_log_storage.get_latest_asset_check_execution_by_key(
                    [AssetCheckKey(key, check)]
                )[AssetCheckKey(key, check)]
                assert record.event.dagster_event.event_specific_data.passed, (source, check)

    # A second run is a new set of copies beside the first, and still succeeds.
    again = run_cli("demo", "--home", str(home), cwd=ROOT, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    listed = run_cli(
        "--plan", str(home / "demo" / "spark_backup.yaml"), "list", "--json", check=True
    )
    assert len(json.loads(listed.stdout)) == 6
