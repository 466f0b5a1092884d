"""A restore killed outright (``kill -9``) at any point before it publishes leaves the target as it
was, apart from its private staging folder; the next restore into that target removes the
staging folders of killed restores and says so; the ``--json`` summary names what a restore
did not restore (issue 12, item 7)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

from spark_backup.engine.staging import STAGING_PREFIX
from spark_backup.service import BackupService
from spark_backup_tests.helpers import (
    SPARK_BACKUP,
    config_source,
    plan_dict,
    run_cli,
    write_plan,
)
from spark_backup_tests.test_config_archive import _store_tar
from spark_backup_tests.test_hardening import _wait_for

# Enough that each moment below lasts tens of milliseconds against the test's 5 ms polls: 300
# small files were extracted within a few milliseconds once restores got faster.
SMALL_FILES = 3000


def _estate(root: Path) -> Path:
    """A large file first (the restore spends a moment inside it), many small ones after it."""
    (root / "a_model").mkdir(parents=True)
    with open(root / "a_model" / "weights.bin", "wb") as handle:
        for _ in range(8):
            handle.write(os.urandom(4 << 20))
    for n in range(SMALL_FILES):
        folder = root / "b_conf" / f"d{n % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{n}.conf").write_text(f"key{n} = value{n}\n" * 20)
    return root


def _staging(target: Path) -> list[Path]:
    return [p for p in target.iterdir() if p.name.startswith(STAGING_PREFIX)]


def _staged_files(target: Path) -> int:
    return sum(len(files) for staging in _staging(target) for _, _, files in os.walk(staging))


def test_a_restore_killed_at_any_point_before_publishing_leaves_the_target_as_it_was(
    tmp_path: Path, age_key
) -> None:
    estate = _estate(tmp_path / "estate")
    plan = str(write_plan(tmp_path, plan_dict([age_key[1]], [config_source("m", [str(estate)])])))
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    (manifest,) = json.loads(
        run_cli("--plan", plan, "backup", "m", "--json", env=env, check=True).stdout
    )
    target = tmp_path / "restore"
    target.mkdir()
    (target / "keep.txt").write_text("the operator's own file\n")
    big = "weights.bin"

    # Moments to kill at: staging just made; inside the large file; among the small files.
    moments = {
        "the staging folder exists": lambda: bool(_staging(target)),
        "the large file is being written": lambda: any(
            p.stat().st_size > (1 << 20) for s in _staging(target) for p in s.rglob(big)
        ),
        "small files are being written": lambda: _staged_files(target) > 20,
    }
    killed: list[Path] = []
    for what, moment in moments.items():
        restore = ["restore", manifest["id"], "--to", str(target), "--identity", str(age_key[0])]
        process = subprocess.Popen(
            [*SPARK_BACKUP, "--no-progress", "--plan", plan, *restore],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        _wait_for(lambda m=moment, p=process: m() or p.poll() is not None, what)
        process.kill()
        process.wait()
        assert process.returncode == -9, f"the restore ended before {what}"
        # Nothing of the copy is in the target, only the staging folder the restore made (it
        # removed the one the restore killed before it had left).
        [staging] = _staging(target)
        assert staging not in killed
        assert {p.name for p in target.iterdir()} == {"keep.txt", staging.name}, what
        assert (target / "keep.txt").read_text() == "the operator's own file\n"
        killed.append(staging)

    # The next restore into that target removes it and says so, by name.
    done = run_cli(
        "--plan", plan, "restore", manifest["id"], "--to", str(target),
        "--identity", str(age_key[0]), "--json", env=env, check=True,
    )  # fmt: skip
    summary = json.loads(done.stdout)
    assert summary["stale_staging_removed"] == [str(killed[-1])]
    assert not _staging(target)
    restored = target / str(estate).lstrip("/")
    assert (restored / "a_model" / big).read_bytes() == (estate / "a_model" / big).read_bytes()
    assert len(list((restored / "b_conf").rglob("*.conf"))) == SMALL_FILES

    # In words, too.
    again = tmp_path / "again"
    again.mkdir()
    stale = again / f"{STAGING_PREFIX}89abcdef"
    stale.mkdir()
    (stale / "plaintext.conf").write_text("secret = 1\n")
    text = run_cli(
        "--plan", plan, "restore", manifest["id"], "--to", str(again),
        "--identity", str(age_key[0]), env=env, check=True,
    ).stdout  # fmt: skip
    assert f"removed staging folder {stale}: left by a restore that was killed" in text
    assert not stale.exists()


def test_the_json_summary_names_the_mode_bits_a_restore_did_not_set(
    service: BackupService, age_key, tmp_path: Path
) -> None:
    def build(archive: tarfile.TarFile) -> None:
        for name, mode in [("bin/tool", 0o6755), ("etc/open.conf", 0o646), ("etc/ok.conf", 0o640)]:
            info = tarfile.TarInfo(name)
            info.mode, info.size = mode, 1
            archive.addfile(info, io.BytesIO(b"x"))

    copy_id = _store_tar(service, build)
    done = run_cli(
        "--plan", str(service.plan_path), "restore", copy_id, "--to", str(tmp_path / "r"),
        "--identity", str(age_key[0]), "--json", check=True,
    )  # fmt: skip
    summary = json.loads(done.stdout)
    assert summary["modes_stripped_count"] == 2
    assert summary["modes_stripped"] == ["bin/tool (mode 6755)", "etc/open.conf (mode 646)"]
    assert summary["stale_staging_removed"] == []
    assert (tmp_path / "r/bin/tool").stat().st_mode & 0o7777 == 0o755
    assert (tmp_path / "r/etc/open.conf").stat().st_mode & 0o7777 == 0o644
