"""Documentation that is also a test: the runbooks' by-hand commands and the plan example run."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml

from spark_backup.demo import compare_trees
from spark_backup.plan import load_plan
from spark_backup_tests.helpers import flip_last_byte, write_plan

DOCS = Path(__file__).resolve().parents[1] / "docs"


def fenced_blocks(markdown: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", markdown.read_text(), flags=re.DOTALL)


def run_config_archive_runbook(service, key: Path, staging: Path) -> subprocess.CompletedProcess:
    """The by-hand block of the configuration archive runbook, as an operator would paste it."""
    (script,) = [
        b
        for b in fenced_blocks(DOCS / "runbooks" / "config_archive.md", "bash")
        if b.startswith("# What to restore")
    ]
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={
            **os.environ,
            "STORE": str(service.store("local").root),
            "SOURCE": "dgx_config",
            "KEY": str(key),
            "STAGING": str(staging),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_config_archive_restore_by_hand(service, estate: Path, age_key, tmp_path: Path) -> None:
    """The runbook's by-hand block restores the newest copy with age, zstd, tar and jq alone."""
    service.backup("dgx_config")
    [newest] = service.backup("dgx_config")
    result = run_config_archive_runbook(service, age_key[0], tmp_path / "staging")
    assert result.returncode == 0, result.stdout + result.stderr
    assert newest.id in result.stdout  # step 1 picked the newest copy
    assert compare_trees([estate], tmp_path / "staging", exclude=["*.swp"]) == []


def test_by_hand_restore_stops_on_a_damaged_copy(service, age_key, tmp_path: Path) -> None:
    [manifest] = service.backup("dgx_config")
    data = service.store("local").root / manifest.data_key
    data.write_bytes(flip_last_byte(data.read_bytes()))
    result = run_config_archive_runbook(service, age_key[0], tmp_path / "staging")
    assert result.returncode != 0
    assert "did NOT match" in result.stderr
    assert not (tmp_path / "staging").exists()


def test_plan_reference_example_is_valid(tmp_path: Path) -> None:
    (example,) = [b for b in fenced_blocks(DOCS / "plan.md", "yaml") if b.startswith("version: 1")]
    loaded = load_plan(write_plan(tmp_path, yaml.safe_load(example)))
    assert [s.name for s in loaded.plan.sources] == ["dgx_config"]
    assert loaded.plan.store_for(loaded.plan.sources[0]).name == "offsite"


def test_exit_code_table_matches_the_code() -> None:
    """Every exit code the runbook lists is one the code uses, with the error class behind it,
    and every error class's code is listed."""
    import inspect

    from spark_backup import errors
    from spark_backup.__main__ import INTERRUPTED

    text = (DOCS / "runbooks" / "config_archive.md").read_text()
    table = text.split("### Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", table, flags=re.MULTILINE)}
    used = {
        cls.exit_code
        for _name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.SparkBackupError)
    }
    assert documented == used | {0, INTERRUPTED}


def run_config_archive_drill(service, key: Path, tmpdir: Path) -> subprocess.CompletedProcess:
    """The by-hand restore drill of the configuration archive runbook."""
    (script,) = [
        b
        for b in fenced_blocks(DOCS / "runbooks" / "config_archive.md", "bash")
        if b.startswith("# A restore drill by hand")
    ]
    tmpdir.mkdir(exist_ok=True)
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={
            **os.environ,
            "STORE": str(service.store("local").root),
            "SOURCE": "dgx_config",
            "KEY": str(key),
            "TMPDIR": str(tmpdir),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_config_archive_drill_by_hand(service, age_key, tmp_path: Path) -> None:
    """The runbook's drill restores the newest copy into a new folder, counts what the backup
    archived, times it against the RTO and removes the folder, also when it fails."""
    [manifest] = service.backup("dgx_config")
    result = run_config_archive_drill(service, age_key[0], tmp_path / "tmp")
    assert result.returncode == 0, result.stderr
    files = manifest.source_metadata["files"]
    assert f"restored {files} files" in result.stdout
    assert f"drill of {manifest.id} passed in" in result.stdout
    assert list((tmp_path / "tmp").iterdir()) == []
    data = service.store("local").root / manifest.data_key
    data.write_bytes(flip_last_byte(data.read_bytes()))
    failed = run_config_archive_drill(service, age_key[0], tmp_path / "tmp")
    assert failed.returncode != 0 and "did NOT match" in failed.stderr
    assert list((tmp_path / "tmp").iterdir()) == []
