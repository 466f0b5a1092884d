"""The orchestration journal, the task overview CSV and the Definition of Done: written after
backups and drills, every byte that is not the drill's left as it was, malformed files refused
and left unchanged."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from spark_backup.journal import JournalError, TaskColumns, tick_definition_of_done, update_task_row
from spark_backup.service import BackupService
from spark_backup_tests.helpers import config_source, flip_last_byte, plan_dict, write_plan

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
VALUES = {"status": "erledigt", "date": "2026-11-29T20:00:00Z", "evidence": "drill.md"}


def _copy_example(name: str, target: Path) -> Path:
    shutil.copyfile(EXAMPLES / name, target / name)
    return target / name


def test_task_row_updated_in_place_keeping_every_other_byte(tmp_path: Path) -> None:
    path = _copy_example("Agenten_Aufgaben_Uebersicht.csv", tmp_path)
    before = path.read_bytes().split(b"\r\n")
    assert update_task_row(path, TaskColumns(), "restore-drill", VALUES, "x") == "updated"
    after = path.read_bytes().split(b"\r\n")
    assert len(after) == len(before)
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert changed == [2]
    assert after[2] == (
        b'"restore-drill";"Monatlicher Restore-Test (isolierte Staging-Umgebung)";'
        b'"team:platform";"erledigt";"2026-11-29T20:00:00Z";"drill.md"'
    )


def test_task_row_created_in_the_files_own_style_and_encoding(tmp_path: Path) -> None:
    """A comma-separated, minimally quoted Windows-1252 file with a row that has a quoted
    delimiter: the new row is appended in that style; the rest is unchanged."""
    path = tmp_path / "tasks.csv"
    original = 'ID,Aufgabe,Status,Datum,Nachweis\nbackup,"Sicherung, täglich",offen,,\n'
    path.write_bytes(original.encode("cp1252"))
    assert update_task_row(path, TaskColumns(), "restore-drill", VALUES, "Drill, monatlich") == (
        "created"
    )
    raw = path.read_bytes()
    assert raw.startswith(original.encode("cp1252"))
    assert raw[len(original.encode("cp1252")) :] == (
        b'restore-drill,"Drill, monatlich",erledigt,2026-11-29T20:00:00Z,drill.md\n'
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("ID;Aufgabe\nrestore-drill;x\n", "header has no column 'Status'"),
        ("ID;Aufgabe;Status;Datum;Nachweis\nrestore-drill;x;offen\n", "row 2 has 3 fields"),
        (
            "ID;Status;Datum;Nachweis\nrestore-drill;a;;\nrestore-drill;b;;\n",
            "appears 2 times",
        ),
        ("", "no delimiter found"),
    ],
)
def test_malformed_task_csv_is_refused_and_left_unchanged(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "tasks.csv"
    path.write_text(content)
    with pytest.raises(JournalError, match=expected):
        update_task_row(path, TaskColumns(), "restore-drill", VALUES, "x")
    assert path.read_text() == content


def test_definition_of_done_ticks_one_item_and_restamps_it(tmp_path: Path) -> None:
    path = _copy_example("DEFINITION_OF_DONE.md", tmp_path)
    before = path.read_text().splitlines(keepends=True)
    line = tick_definition_of_done(path, "Restore-Probe", "2026-11-29T20:00:00Z")
    assert line == (
        "- [x] Restore-Probe in isolierter Staging-Umgebung erfolgreich "
        "(Restore-Drill bestanden: 2026-11-29T20:00:00Z)"
    )
    after = path.read_text().splitlines(keepends=True)
    assert [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b] == [4]
    tick_definition_of_done(path, "Restore-Probe", "2026-12-01T03:00:00Z")
    assert path.read_text().count("Restore-Drill bestanden") == 1
    assert "bestanden: 2026-12-01T03:00:00Z)" in path.read_text()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("# DoD\n\n- [ ] something else\n", "no checklist item"),
        ("- [ ] Restore-Probe A\n- [ ] Restore-Probe B\n", "2 checklist items"),
    ],
)
def test_malformed_definition_of_done_is_refused_and_left_unchanged(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "DoD.md"
    path.write_text(content)
    with pytest.raises(JournalError, match=expected):
        tick_definition_of_done(path, "Restore-Probe", "now")
    assert path.read_text() == content


@pytest.fixture
def journal_plan(tmp_path: Path, age_key, estate: Path) -> Path:
    (tmp_path / "docs").mkdir()
    _copy_example("Agenten_Aufgaben_Uebersicht.csv", tmp_path)
    _copy_example("DEFINITION_OF_DONE.md", tmp_path / "docs")
    plan = plan_dict(
        [age_key[1]], [config_source("vpn_config", [str(estate / "wireguard")], cadence="daily")]
    )
    plan["encryption"]["identity_file"] = str(age_key[0])
    return write_plan(tmp_path, plan)


def test_backup_and_passed_drill_are_journaled_and_update_csv_and_dod(
    journal_plan: Path, tmp_path: Path
) -> None:
    service = BackupService.from_path(journal_plan)
    (manifest,) = service.backup("vpn_config")
    report = service.drill("vpn_config")
    assert report.passed and report.journal_errors == []
    journal = tmp_path / "orchestration_journal" / "backups"
    (day,) = journal.glob("*.jsonl")
    entries = [json.loads(line) for line in day.read_text().splitlines()]
    assert [e["event"] for e in entries] == ["backup", "drill"]
    assert entries[0]["copy_id"] == manifest.id and entries[0]["bytes"] > 0
    assert entries[1]["passed"] and entries[1]["rto_seconds"] == 7200
    (summary,) = journal.glob("drill-vpn_config-*.md")
    assert entries[1]["summary"] == summary.name
    text = summary.read_text()
    assert "# Restore drill of vpn_config: passed" in text and manifest.id in text
    rows = (tmp_path / "Agenten_Aufgaben_Uebersicht.csv").read_text(encoding="utf-8")
    drill_row = next(line for line in rows.splitlines() if line.startswith('"restore-drill"'))
    assert (
        '"erledigt"' in drill_row and f"orchestration_journal/backups/{summary.name}" in drill_row
    )
    dod = (tmp_path / "docs" / "DEFINITION_OF_DONE.md").read_text()
    assert "- [x] Restore-Probe in isolierter Staging-Umgebung erfolgreich (Restore-Drill" in dod


def test_failed_drill_is_journaled_and_touches_neither_csv_nor_dod(
    journal_plan: Path, tmp_path: Path
) -> None:
    service = BackupService.from_path(journal_plan)
    (manifest,) = service.backup("vpn_config")
    ref = service.find(manifest.id)
    path = Path(ref.store.object_uri(manifest.data_key).removeprefix("file://"))
    path.write_bytes(flip_last_byte(path.read_bytes()))
    csv_before = (tmp_path / "Agenten_Aufgaben_Uebersicht.csv").read_bytes()
    dod_before = (tmp_path / "docs" / "DEFINITION_OF_DONE.md").read_bytes()
    report = service.drill("vpn_config")
    assert not report.passed
    assert (tmp_path / "Agenten_Aufgaben_Uebersicht.csv").read_bytes() == csv_before
    assert (tmp_path / "docs" / "DEFINITION_OF_DONE.md").read_bytes() == dod_before
    (summary,) = (tmp_path / "orchestration_journal" / "backups").glob("drill-*.md")
    assert "FAILED" in summary.read_text() and "| FAIL |" in summary.read_text()


def test_a_malformed_csv_is_named_and_the_drill_still_passes(
    journal_plan: Path, tmp_path: Path
) -> None:
    csv_path = tmp_path / "Agenten_Aufgaben_Uebersicht.csv"
    csv_path.write_text("ID;Aufgabe\n")
    service = BackupService.from_path(journal_plan)
    service.backup("vpn_config")
    report = service.drill("vpn_config")
    assert report.passed
    assert len(report.journal_errors) == 1 and "header has no column" in report.journal_errors[0]
    assert csv_path.read_text() == "ID;Aufgabe\n"


def test_journal_auto_commit(tmp_path: Path, age_key, estate: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "start"], check=True)
    subprocess.run(["git", "-C", str(repo), "config", "user.name", "t"], check=True)
    subprocess.run(["git", "-C", str(repo), "config", "user.email", "t@example.com"], check=True)
    plan = plan_dict(
        [age_key[1]], [config_source("vpn_config", [str(estate / "wireguard")], cadence="daily")]
    )
    plan["journal"] = {"dir": "repo/orchestration_journal/backups", "auto_commit": True}
    BackupService.from_path(write_plan(tmp_path, plan)).backup("vpn_config")
    log = subprocess.run(
        ["git", "-C", str(repo), "log", "--format=%s", "--name-only"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "journal: backup vpn_config" in log and ".jsonl" in log
    status = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True
    ).stdout
    assert status == ""


def test_shipped_journal_example_has_the_format_the_code_writes() -> None:
    folder = EXAMPLES / "orchestration_journal" / "backups"
    (day,) = folder.glob("*.jsonl")
    entries = [json.loads(line) for line in day.read_text().splitlines()]
    assert {e["event"] for e in entries} == {"backup", "drill"}
    for entry in entries:
        assert entry["at"].startswith(day.stem)
        if entry["event"] == "drill":
            assert (folder / entry["summary"]).exists() or entry["source"] != "vpn_config"
