"""The WAL prefetch of pg-pitr (``prefetch.py``) and its ``restore_command`` script, driven as
the server drives it: the real script, called once per file in replay order. The fetch is a
stand-in that writes each file's name as its content (the real fetch is tested end to end in
test_postgres.py's PITR tests)."""

from __future__ import annotations

import datetime as dt
import subprocess
import threading
import time
from pathlib import Path

import pytest

from spark_backup.errors import IntegrityError
from spark_backup.sources.postgres.prefetch import FAILED_SUFFIX, WalPrefetch
from spark_backup.sources.postgres.wal import ArchivedWal

NOW = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
HISTORY = "00000002.history"


def entry(name: str) -> ArchivedWal:
    return ArchivedWal(name, "0" * 64, f"src/wal/{name}-x.zst.age", NOW, 1)


def segments(count: int) -> list[str]:
    return [f"0000000100000000000000{number:02X}" for number in range(2, 2 + count)]


class Recorder:
    """A fetch that records what it fetched; ``fail`` names a file whose fetch raises."""

    def __init__(self, fail: str | None = None):
        self.fetched: list[str] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, wal: ArchivedWal, destination: Path) -> None:
        if wal.name == self.fail:
            raise IntegrityError(f"WAL file {wal.name}: age: damaged")
        destination.write_text(wal.name)
        with self.lock:
            self.fetched.append(wal.name)


def ask(prefetch: WalPrefetch, name: str, pg_wal: Path) -> int:
    """Run the restore_command as the server would: ``%f`` and ``%p``."""
    pg_wal.mkdir(exist_ok=True)
    return subprocess.run(
        [str(prefetch.script), name, str(pg_wal / "RECOVERYXLOG")], timeout=30
    ).returncode


def on_disk(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if len(p.name) == 24)


def test_serves_in_order_within_a_bounded_window_and_refetches_a_reread(tmp_path: Path) -> None:
    names = segments(12)
    folder, pg_wal = tmp_path / "wal_archive", tmp_path / "pg_wal"
    fetch = Recorder()
    wanted = [entry(HISTORY), *map(entry, names)]
    with WalPrefetch(wanted, folder, fetch, None, workers=3, ahead=2) as prefetch:
        assert ask(prefetch, HISTORY, pg_wal) == 0
        assert (pg_wal / "RECOVERYXLOG").read_text() == HISTORY
        assert ask(prefetch, "00000003.history", pg_wal) == 1  # not archived: exit 1 at once
        for name in names[:6]:
            assert ask(prefetch, name, pg_wal) == 0
            assert (pg_wal / "RECOVERYXLOG").read_text() == name
            time.sleep(0.1)  # the prefetch follows the server's asks
            kept = on_disk(folder)
            assert kept[0] == name  # the ones before are deleted
            assert len(kept) <= 1 + prefetch.ahead + 1
        # The segment the server stopped in, asked again after its deletion: fetched again.
        assert ask(prefetch, names[3], pg_wal) == 0
        assert (pg_wal / "RECOVERYXLOG").read_text() == names[3]
    assert fetch.fetched.count(names[3]) == 2
    assert names[-1] not in fetch.fetched  # far beyond what was asked: never fetched
    assert HISTORY in (p.name for p in folder.iterdir())  # history files are kept


def test_a_failed_fetch_aborts_recovery_and_is_never_served(tmp_path: Path) -> None:
    names = segments(4)
    folder, pg_wal = tmp_path / "wal_archive", tmp_path / "pg_wal"
    with WalPrefetch(
        [entry(name) for name in names], folder, Recorder(fail=names[1]), None, ahead=4
    ) as prefetch:
        assert ask(prefetch, names[0], pg_wal) == 0
        assert ask(prefetch, names[1], pg_wal) == 255  # above 125: recovery aborts
        assert isinstance(prefetch.refused(), IntegrityError)
    assert "damaged" in (folder / f"{names[1]}{FAILED_SUFFIX}").read_text()
    assert not (folder / names[1]).exists()
    assert (pg_wal / "RECOVERYXLOG").read_text() == names[0]


def test_a_failed_fetch_the_server_never_asks_for_fails_nothing(tmp_path: Path) -> None:
    """A damaged file past the recovery target: the files before it are still served."""
    names = segments(5)
    folder, pg_wal = tmp_path / "wal_archive", tmp_path / "pg_wal"
    with WalPrefetch(
        [entry(name) for name in names], folder, Recorder(fail=names[4]), None, ahead=4
    ) as prefetch:
        for name in names[:4]:
            assert ask(prefetch, name, pg_wal) == 0
        assert prefetch.refused() is None
    assert list(prefetch.failures) == [names[4]]


def test_the_server_never_waits_for_a_prefetch_that_is_gone(tmp_path: Path) -> None:
    """A killed pg-pitr (its process gone) aborts the recovery rather than leaving it waiting."""
    names = segments(2)
    folder, pg_wal = tmp_path / "wal_archive", tmp_path / "pg_wal"
    gate = threading.Event()

    def stuck(wal: ArchivedWal, destination: Path) -> None:
        gate.wait(30)

    with WalPrefetch([entry(name) for name in names], folder, stuck, None) as prefetch:
        gone = subprocess.Popen(["true"])
        gone.wait()
        script = prefetch.script.read_text()
        prefetch.script.write_text(script.replace(f"/proc/{_pid(script)}", f"/proc/{gone.pid}"))
        started = time.monotonic()
        assert ask(prefetch, names[0], pg_wal) == 255
        assert time.monotonic() - started < 5
        gate.set()


def _pid(script: str) -> str:
    return script.split("[ -d /proc/", 1)[1].split(" ]", 1)[0]


@pytest.mark.parametrize("count", [0, 1])
def test_nothing_to_fetch_or_one_file(tmp_path: Path, count: int) -> None:
    names = segments(count)
    folder, pg_wal = tmp_path / "wal_archive", tmp_path / "pg_wal"
    with WalPrefetch([entry(name) for name in names], folder, Recorder(), None) as prefetch:
        for name in names:
            assert ask(prefetch, name, pg_wal) == 0
        assert ask(prefetch, segments(count + 1)[-1], pg_wal) == 1  # the end of the WAL
    assert not prefetch.failures and prefetch.fetched == count
