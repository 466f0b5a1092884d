"""Hardening of the copy path (issue 12, item 7): each case a held-out test of an earlier release
found, checked where an operator meets it."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from spark_backup.engine.staging import STAGING_PREFIX
from spark_backup.errors import RestoreRefused, SourceError
from spark_backup.service import BackupService
from spark_backup_tests.helpers import (
    SPARK_BACKUP,
    config_source,
    plan_dict,
    run_cli,
    write_plan,
)
from spark_backup_tests.test_config_archive import _add, _store_tar


def _big_file(folder: Path, megabytes: int) -> Path:
    """Incompressible data large enough that a backup or restore takes a moment."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "weights.bin"
    with open(path, "wb") as handle:
        for _ in range(megabytes // 4):
            handle.write(os.urandom(4 << 20))
    return path


# --- names an earlier release crashed on ----------------------------------------------------------


def test_a_deeply_nested_member_is_restored_or_refused_in_one_line(
    service: BackupService, age_key, tmp_path: Path
) -> None:
    deep = "/".join(["d"] * 200) + "/f.conf"
    copy_id = _store_tar(service, lambda a: _add(a, deep, data=b"deep"))
    service.restore(copy_id, tmp_path / "ok", identity_file=age_key[0])
    assert (tmp_path / "ok" / deep).read_bytes() == b"deep"

    # Deeper than the guard allows, and longer than any path the kernel opens: refused, not a
    # RecursionError from deep inside tarfile.
    for name, reason in [
        ("/".join(["d"] * 1200) + "/f", "nested deeper than 256 folders"),
        ("/".join(["n" * 200] * 25), "longer than 4095 bytes"),
    ]:
        copy_id = _store_tar(service, lambda a, name=name: _add(a, name))
        with pytest.raises(RestoreRefused, match=reason):
            service.restore(copy_id, tmp_path / "refused", identity_file=age_key[0])
        assert not (tmp_path / "refused").exists()


def test_escape_sequences_in_names_and_manifests_never_reach_the_terminal(
    tmp_path: Path, age_key
) -> None:
    estate = tmp_path / "estate"
    estate.mkdir()
    (estate / "ok.conf").write_text("x")
    os.mkfifo(estate / "evil\x1b]0;owned\x07[red]fifo")  # skipped with a warning naming it
    plan = write_plan(tmp_path, plan_dict([age_key[1]], [config_source("etc", [str(estate)])]))
    backup = run_cli("--plan", str(plan), "backup", "etc", check=True)
    assert "\x1b" not in backup.stderr and "\x07" not in backup.stderr
    assert "evil\\x1b]0;owned\\x07[red]fifo is a socket, FIFO or device file" in backup.stderr

    # A manifest is plain JSON anyone with access to the store may edit: its fields are shown
    # escaped, and as text, never as rich markup.
    [manifest_path] = (tmp_path / "store").rglob("*.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["partition"] = "2026-11-23\x1b[2J\x1b]0;pwn\x07[bold]"
    manifest_path.write_text(json.dumps(manifest))
    listed = run_cli("--plan", str(plan), "list", check=True)
    assert "\x1b" not in listed.stdout and "\x07" not in listed.stdout
    assert "\\x1b[2J" in listed.stdout.replace("\n", "").replace(" ", "")
    assert "[bold]" in listed.stdout.replace("\n", "").replace(" ", "")


# --- files that change while they are read --------------------------------------------------------


def _torn_plan(
    tmp_path: Path, age_key, name: str = "weights.bin", **extra
) -> tuple[BackupService, Path]:
    estate = tmp_path / "estate"
    live = _big_file(estate, 24).rename(estate / name)  # more than a pipe holds: tar is inside
    (estate / "z_quiet.conf").write_text("quiet\n")
    plan = plan_dict([age_key[1]], [config_source("live", [str(estate)], **extra)])
    return BackupService.from_path(write_plan(tmp_path, plan)), live


def _shrink_once(path: Path):
    """A progress callback: as the first plaintext arrives (tar is inside ``path``'s data, having
    sized it), the file is emptied, as a log rotated in place would be."""

    def progress(_count: int) -> None:
        if path.stat().st_size:
            path.write_bytes(b"")

    return progress


def _grow_once(path: Path):
    """As ``_shrink_once``, but the file grows, as a log written to would."""
    grown: list[bool] = []

    def progress(_count: int) -> None:
        if not grown:
            grown.append(True)
            with open(path, "ab") as handle:
                handle.write(b"appended while tar read the file\n")

    return progress


@pytest.mark.parametrize(
    ("change", "what"), [(_shrink_once, "padded with zeros"), (_grow_once, "two versions")]
)
def test_a_file_that_changes_while_read_fails_the_backup_and_names_it(
    tmp_path: Path, age_key, change, what
) -> None:
    service, live = _torn_plan(tmp_path, age_key)
    with pytest.raises(
        SourceError, match=rf"1 file\(s\) changed while tar read .*{what}.*{live}.*allow_torn_files"
    ):
        service.backup("live", progress=change(live))
    assert service.copies() == []  # no copy that looks valid but is not
    assert SourceError.exit_code != 0


def test_allowed_torn_files_are_recorded_and_named_by_restore_and_verify(
    tmp_path: Path, age_key
) -> None:
    service, live = _torn_plan(tmp_path, age_key, allow_torn_files=True)
    [manifest] = service.backup("live", progress=_shrink_once(live))
    assert manifest.source_metadata["torn_files"] == [str(live)]
    assert manifest.source_metadata["changed_files"] == []

    summary = service.restore(manifest.id, tmp_path / "r", identity_file=age_key[0])
    assert [c for c in summary["cautions"] if str(live) in c and "torn" in c]
    outcome = service.verify(service.find(manifest.id), service.identities(age_key[0]))
    assert outcome.ok and [c for c in outcome.cautions if str(live) in c]

    plan = str(service.plan_path)
    verified = run_cli("--plan", plan, "verify", "--identity", str(age_key[0]), check=True)
    assert f"warning: {manifest.id}: {live} was torn" in verified.stderr
    restored = run_cli(
        "--plan", plan, "restore", manifest.id, "--to", str(tmp_path / "r2"),
        "--identity", str(age_key[0]), check=True,
    )  # fmt: skip
    assert f"{live} was torn" in restored.stderr


def test_a_grown_file_is_recorded_by_its_exact_name_and_old_manifests_still_verify(
    tmp_path: Path, age_key, monkeypatch
) -> None:
    # tar quotes names in its messages (a newline as \n, other bytes in octal in the C locale):
    # the manifest records the real name.
    monkeypatch.setenv("LANG", "C")
    monkeypatch.delenv("LC_ALL", raising=False)
    service, live = _torn_plan(tmp_path, age_key, name="caf\u00e9\nlog \\1", allow_torn_files=True)
    [manifest] = service.backup("live", progress=_grow_once(live))
    assert manifest.source_metadata["changed_files"] == [str(live)]
    assert manifest.source_metadata["torn_files"] == []
    restored = service.restore(manifest.id, tmp_path / "r", identity_file=age_key[0])
    [caution] = restored["cautions"]
    assert caution.startswith(f"{live} was torn: it changed while the backup read it")
    # The copy holds the file as large as tar found it, without what was appended.
    copied = tmp_path / "r" / str(live).lstrip("/")
    assert copied.stat().st_size == live.stat().st_size - len(b"appended while tar read the file\n")

    # A manifest of the release before changed files were recorded lists and verifies as before.
    [path] = (tmp_path / "store").rglob("manifests/*.json")
    recorded = json.loads(path.read_text())
    del recorded["source_metadata"]["changed_files"]
    path.write_text(json.dumps(recorded))
    outcome = service.verify(service.find(manifest.id), service.identities(age_key[0]))
    assert outcome.ok and outcome.cautions == []


# --- interrupts and kills -------------------------------------------------------------------------


def _spark_backup(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """spark-backup in a process group of its own, Ctrl-C acting as in a terminal."""
    return subprocess.Popen(
        [*SPARK_BACKUP, "--no-progress", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# The modules Python runs for ``python -m spark_backup`` before spark-backup's Ctrl-C handler.
ENTRY_MODULES = ("__init__.py", "__main__.py")


def _interrupted_before_spark_backup_ran(returncode: int, err: str) -> bool:
    """Ctrl-C that landed while the interpreter started (site, runpy, the entry module's own
    imports), before spark-backup's handler was installed: Python's traceback, in no
    spark-backup file but the entry module, and a death by SIGINT, as for any Python program."""
    files = re.findall(r'File "([^"]+)"', err)
    ours = [f for f in files if "spark_backup" in f and Path(f).name not in ENTRY_MODULES]
    return returncode == -signal.SIGINT and "KeyboardInterrupt" in err and not ours


def test_ctrl_c_during_a_backup_exits_130_and_leaves_no_copy(tmp_path: Path, age_key) -> None:
    big = _big_file(tmp_path / "estate", 64)
    plan = str(write_plan(tmp_path, plan_dict([age_key[1]], [config_source("m", [str(big)])])))
    store = tmp_path / "store"

    # Early: while the command imports, reads the plan, starts tar and the pipeline's threads.
    for delay in (0.1, 0.4, 0.8):
        process = _spark_backup("--plan", plan, "backup", "m")
        time.sleep(delay)
        os.killpg(process.pid, signal.SIGINT)
        _out, err = process.communicate(timeout=60)
        if _interrupted_before_spark_backup_ran(process.returncode, err):
            continue  # a loaded machine's 0.1 s can end inside the interpreter's own start
        assert process.returncode in (0, 130), err
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
        assert not [p for p in store.rglob("*") if ".partial-" in p.name]
    for copy in json.loads(run_cli("--plan", plan, "verify", "--json", check=True).stdout):
        assert copy["ok"]  # whatever finished before its Ctrl-C is whole
    for manifest in store.rglob("manifests/*.json"):
        manifest.unlink()

    process = _spark_backup("--plan", plan, "backup", "m")
    _wait_for(
        lambda: any(
            ".partial-" in p.name and p.stat().st_size > (1 << 20) for p in store.rglob("*")
        ),
        "the backup to write",
    )
    os.killpg(process.pid, signal.SIGINT)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err and "age encryption" not in err
    assert json.loads(run_cli("--plan", plan, "list", "--json", check=True).stdout) == []

    # Just after the commit: the copy is whole, and the exit is a clean one, never a death
    # by SIGINT.
    process = _spark_backup("--plan", plan, "backup", "m")
    _wait_for(lambda: any(store.rglob("manifests/*.json")), "the commit")
    os.killpg(process.pid, signal.SIGINT)
    _out, err = process.communicate(timeout=60)
    assert process.returncode in (0, 130), err
    assert "Traceback" not in err
    verified = run_cli("--plan", plan, "verify", "--json", check=True)
    assert [v["ok"] for v in json.loads(verified.stdout)] == [True]


def test_ctrl_c_while_the_backup_starts_leaves_no_stage_running(
    tmp_path: Path, age_key, monkeypatch
) -> None:
    """Ctrl-C can land while the pipeline starts its threads: the one already running must stop
    (an earlier release left it waiting forever, and the interrupted command never exited)."""
    estate = tmp_path / "estate"
    estate.mkdir()
    (estate / "a.conf").write_text("x\n")
    plan = plan_dict([age_key[1]], [config_source("c", [str(estate)])])
    service = BackupService.from_path(write_plan(tmp_path, plan))
    start = threading.Thread.start

    def interrupted_start(thread: threading.Thread) -> None:
        if thread.name == "backup-age":  # the compressing stage is running by now
            raise KeyboardInterrupt
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", interrupted_start)
    with pytest.raises(KeyboardInterrupt):
        service.backup("c")
    monkeypatch.undo()
    _wait_for(
        lambda: not [t for t in threading.enumerate() if t.name.startswith("backup-")],
        "the started stage to stop",
        timeout=10,
    )
    assert service.copies() == []
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]


def _run_patched_cli(folder: Path, patch: str) -> subprocess.CompletedProcess[str]:
    """spark-backup's entry point run after ``patch`` (Python run first, from ``folder``)."""
    (folder / "interrupted_cli.py").write_text(
        f"{patch}\nfrom spark_backup.__main__ import main\nmain()\n"
    )
    return subprocess.run(
        [SPARK_BACKUP[0], "-m", "interrupted_cli"],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(folder)},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "patch",
    [
        # while the command line is imported (a dataclass's methods are made by exec) ...
        "import spark_backup.cli as cli\ncli.main = lambda: exec('raise KeyboardInterrupt')",
        # ... and while a command runs (click's own handling of it included)
        "import spark_backup.cli.app as app\n"
        "app.cli.main = lambda *a, **k: exec('raise KeyboardInterrupt')",
        # while a class is made: CPython 3.11 wraps it in a RuntimeError
        "import spark_backup.cli as cli\n"
        "class Field:\n    def __set_name__(self, owner, name): raise KeyboardInterrupt\n"
        "cli.main = lambda: type('Outcome', (), {'delivered': Field()})",
    ],
)
def test_ctrl_c_where_cpython_bends_it_still_exits_130(tmp_path: Path, patch: str) -> None:
    """CPython kills ``python -m`` by SIGINT at its end (exit -2) once a KeyboardInterrupt passed
    through exec'd code, even if it was handled, and wraps one raised while a class is made in a
    RuntimeError (a traceback, exit 1); spark-backup exits 130 with its one line all the same."""
    result = _run_patched_cli(tmp_path, patch)
    assert result.returncode == 130
    assert result.stderr == "interrupted: nothing unfinished was published\n"


def test_ctrl_c_inside_an_import_waits_for_the_import_then_exits_130(tmp_path: Path) -> None:
    """An interrupt that lands while a module is imported is held until the import is done (an
    extension module cut short in its initialisation, pyrage's Rust code, panics and prints its
    own trace), then ends the command as anywhere else: 130 and one line."""
    (tmp_path / "interrupted_import.py").write_text(
        "import os, pathlib, signal\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "for _ in range(100_000):\n    pass\n"  # the handler runs here, inside the import
        "pathlib.Path('imported-whole').write_text('yes')\n"
    )
    result = _run_patched_cli(
        tmp_path,
        "import time\nimport spark_backup.cli as cli\n"
        "cli.main = lambda: (__import__('interrupted_import'), time.sleep(30))",
    )
    assert (tmp_path / "imported-whole").exists(), "the import was cut short"
    assert result.returncode == 130
    assert result.stderr == "interrupted: nothing unfinished was published\n"


def test_staging_of_a_killed_restore_is_removed_by_prune_and_the_next_restore(
    tmp_path: Path, age_key
) -> None:
    big = _big_file(tmp_path / "estate", 48)
    plan = str(
        write_plan(
            tmp_path,
            plan_dict([age_key[1]], [config_source("m", [str(big)])]),
        )
    )
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    (manifest,) = json.loads(
        run_cli("--plan", plan, "backup", "m", "--json", env=env, check=True).stdout
    )
    target = tmp_path / "restore"
    live = target / f"{STAGING_PREFIX}0123abcd"

    def killed_restore() -> Path:
        process = _spark_backup(
            "--plan", plan, "restore", manifest["id"], "--to", str(target),
            "--identity", str(age_key[0]), env=env,
        )  # fmt: skip
        _wait_for(
            lambda: any(p.stat().st_size > (1 << 20) for p in target.rglob("weights.bin")),
            "the restore to write",
        )
        process.kill()
        process.wait()
        [staging] = [p for p in target.iterdir() if p.name.startswith(STAGING_PREFIX) and p != live]
        return staging

    staging = killed_restore()
    # A staging folder a running restore holds is never taken.
    live.mkdir()
    held = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        dry = json.loads(run_cli("--plan", plan, "prune", "--json", env=env, check=True).stdout)
        assert dry["stale_restore_staging"] == [str(staging)] and staging.exists()
        text = run_cli("--plan", plan, "prune", env=env, check=True).stdout
        assert f"would delete staging folder {staging}: left by a restore that was killed" in text
        applied = json.loads(
            run_cli("--plan", plan, "prune", "--apply", "--json", env=env, check=True).stdout
        )
        assert applied["stale_restore_staging"] == [str(staging)]
        assert not staging.exists() and live.exists()

        # The next restore into the same target removes what a killed one left there.
        staging = killed_restore()
        run_cli(
            "--plan", plan, "restore", manifest["id"], "--to", str(tmp_path / "elsewhere"),
            "--identity", str(age_key[0]), env=env, check=True,
        )  # fmt: skip
        assert staging.exists()  # another target's restore leaves it to prune
        run_cli(
            "--plan", plan, "restore", manifest["id"], "--to", str(target),
            "--identity", str(age_key[0]), env=env, check=True,
        )  # fmt: skip
        assert not staging.exists() and live.exists()
        assert (target / str(big).lstrip("/")).read_bytes() == big.read_bytes()
    finally:
        os.close(held)


# --- what a restore changes or replaces -----------------------------------------------------------


def test_overwrite_never_lets_a_link_of_the_copy_replace_a_folder(
    service: BackupService, age_key, tmp_path: Path
) -> None:
    copy_id = _store_tar(
        service,
        lambda a: (
            _add(a, "srv/other", kind=tarfile.DIRTYPE),
            _add(a, "srv/conf", kind=tarfile.SYMTYPE, link="other"),
        ),
    )
    target = tmp_path / "restore"
    (target / "srv/conf").mkdir(parents=True)
    (target / "srv/conf/keep.txt").write_text("not in the copy")
    result = run_cli(
        "--plan", str(service.plan_path), "restore", copy_id, "--to", str(target),
        "--identity", str(age_key[0]), "--overwrite",
    )  # fmt: skip
    assert result.returncode == RestoreRefused.exit_code
    assert result.stderr.strip() == (
        f"error: restore would replace the folder {target / 'srv/conf'} with a file or link of "
        "the copy, removing what is in it; move the folder away or restore into an empty folder"
    )
    assert (target / "srv/conf/keep.txt").read_text() == "not in the copy"
    assert sorted(p.name for p in target.iterdir()) == ["srv"]  # no staging left


def test_mode_bits_a_restore_does_not_set_are_reported(
    service: BackupService, age_key, tmp_path: Path
) -> None:
    def build(archive: tarfile.TarFile) -> None:
        for name, mode, kind in [
            ("opt/bin/helper", 0o4755, tarfile.REGTYPE),
            ("opt/shared.conf", 0o666, tarfile.REGTYPE),
            ("opt/spool", 0o1777, tarfile.DIRTYPE),
            ("opt/plain.conf", 0o644, tarfile.REGTYPE),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.mode = kind, mode
            info.size = 1 if kind == tarfile.REGTYPE else 0
            archive.addfile(info, io.BytesIO(b"x") if info.size else None)

    copy_id = _store_tar(service, build)
    summary = service.restore(copy_id, tmp_path / "r", identity_file=age_key[0])
    assert summary["modes_stripped_count"] == 3
    assert summary["modes_stripped"] == [
        "opt/bin/helper (mode 4755)",
        "opt/shared.conf (mode 666)",
        "opt/spool (mode 1777)",
    ]
    assert (tmp_path / "r/opt/bin/helper").stat().st_mode & 0o7777 == 0o755
    result = run_cli(
        "--plan", str(service.plan_path), "restore", copy_id, "--to", str(tmp_path / "r2"),
        "--identity", str(age_key[0]), check=True,
    )  # fmt: skip
    assert (
        "restored 3 members without their setuid, setgid, sticky or group/world write bits: "
        "opt/bin/helper (mode 4755), opt/shared.conf (mode 666), opt/spool (mode 1777)"
    ) in result.stdout


# --- prune ---------------------------------------------------------------------------------------


def test_prune_dry_run_lists_the_unfinished_writes_apply_removes(local_plan: Path) -> None:
    plan = str(local_plan)
    run_cli("--plan", plan, "backup", "dgx_config", check=True)
    [manifest] = (local_plan.parent / "store").rglob("*.json")
    partial = (
        manifest.parent.parent
        / "data"
        / ".dgx_config-20261101T000000.000Z-0badc0de.tar.zst.age.partial-0badc0de"
    )
    partial.write_bytes(b"half a copy")
    two_days_ago = time.time() - 2 * 86400
    os.utime(partial, (two_days_ago, two_days_ago))
    key = f"local:{partial.relative_to(local_plan.parent / 'store').as_posix()}"

    dry = run_cli("--plan", plan, "prune", check=True).stdout
    assert f"would delete unfinished upload {key}" in dry and partial.exists()
    assert json.loads(run_cli("--plan", plan, "prune", "--json", check=True).stdout)[
        "incomplete_uploads"
    ] == [key]
    applied = json.loads(run_cli("--plan", plan, "prune", "--apply", "--json", check=True).stdout)
    assert applied["incomplete_uploads"] == [key] and not partial.exists()
