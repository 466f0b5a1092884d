"""WAL keys carry the cluster's system identifier: two clusters archiving into one source never
mix their WAL, and WAL archived by earlier releases (without it) still lists and fetches."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from spark_backup.service import BackupService
from spark_backup.sources.postgres import ops
from spark_backup.sources.postgres.wal import archived_wal
from spark_backup_tests.helpers import plan_dict, run_cli, write_plan

SEGMENT = "000000010000000000000007"
CLUSTER_A = 7381234567890123456
CLUSTER_B = 7381234567890999999


def fake_cluster(root: Path, system_identifier: int, body: bytes) -> Path:
    """A data directory with ``global/pg_control`` and one segment in ``pg_wal`` whose first
    page starts with the long header PostgreSQL writes (magic, XLP_LONG_HEADER, timeline 1,
    the system identifier, 16 MiB segments, 8 KiB blocks)."""
    (root / "global").mkdir(parents=True)
    (root / "pg_wal").mkdir()
    (root / "global" / "pg_control").write_bytes(struct.pack("<Q", system_identifier) + bytes(8184))
    header = struct.pack(
        "<HHIQI4xQII", 0xD110, 0x0002, 1, 7 << 24, 0, system_identifier, 1 << 24, 8192
    )
    segment = root / "pg_wal" / SEGMENT
    segment.write_bytes(header + body)
    return segment


def test_two_clusters_never_mix_wal_and_earlier_keys_still_read(tmp_path: Path, age_key) -> None:
    source = {
        "name": "pg_main",
        "kind": "postgres",
        "cadence": "daily",
        "owner": "team:dba",
        "host": "127.0.0.1",
        "base_backup": {"enabled": False},
        "wal_archiving": False,
    }
    plan = plan_dict([age_key[1]], [source])
    plan["encryption"]["identity_file"] = str(age_key[0])
    path = str(write_plan(tmp_path, plan))
    (tmp_path / "store").mkdir()
    a = fake_cluster(tmp_path / "a", CLUSTER_A, os.urandom(4096))
    b = fake_cluster(tmp_path / "b", CLUSTER_B, os.urandom(4096))
    for segment in (a, b):
        pushed = run_cli("--plan", path, "wal-push", str(segment))
        assert pushed.returncode == 0, pushed.stderr  # the same name, but another cluster's
    store = BackupService.from_path(Path(path)).store("local")
    owners = {entry.system_identifier for entry in archived_wal(store, "pg_main")}
    assert owners == {str(CLUSTER_A), str(CLUSTER_B)}
    assert [e.sha256 for e in archived_wal(store, "pg_main", SEGMENT, str(CLUSTER_A))] == [
        archived_wal(store, "pg_main", SEGMENT, str(CLUSTER_A))[0].sha256
    ]
    # A history file has no header: it is the cluster's whose pg_wal holds it.
    (tmp_path / "a" / "pg_wal" / "00000002.history").write_text("1\t0/7000000\tno reason\n")
    history = run_cli(
        "--plan", path, "wal-push", str(tmp_path / "a" / "pg_wal" / "00000002.history")
    )
    assert history.returncode == 0, history.stderr
    [entry] = archived_wal(store, "pg_main", "00000002.history")
    assert entry.system_identifier == str(CLUSTER_A)

    # restore_command runs in the recovering cluster's data directory: it gets its own WAL.
    for cluster, segment in (("a", a), ("b", b)):
        fetched = tmp_path / cluster / "pg_wal" / "RECOVERYXLOG"
        result = run_cli("--plan", path, "wal-fetch", SEGMENT, str(fetched))
        assert result.returncode == 0, result.stderr
        assert fetched.read_bytes() == segment.read_bytes()
    # Asked from nowhere in particular, two contents are refused, never guessed.
    nowhere = run_cli("--plan", path, "wal-fetch", SEGMENT, str(tmp_path / "x"))
    assert nowhere.returncode == 255 and "2 different contents" in nowhere.stderr
    assert str(CLUSTER_A) in nowhere.stderr and not (tmp_path / "x").exists()

    # A key of an earlier release (no identifier) is WAL of whichever cluster asks for it.
    legacy_name = "000000010000000000000009"
    [a_entry] = archived_wal(store, "pg_main", SEGMENT, str(CLUSTER_A))
    old = Path(store.root, a_entry.key)  # type: ignore[attr-defined]
    legacy = old.parent.parent / old.name.replace(SEGMENT, legacy_name)
    legacy.write_bytes(old.read_bytes())
    [listed] = archived_wal(store, "pg_main", legacy_name, str(CLUSTER_B))
    assert listed.system_identifier is None
    fetched = tmp_path / "b" / "pg_wal" / "RECOVERYXLOG"
    result = run_cli("--plan", path, "wal-fetch", legacy_name, str(fetched))
    assert result.returncode == 0, result.stderr
    assert fetched.read_bytes() == a.read_bytes()
    # Pushing the same content again is recognised across the layouts: nothing new is written.
    (tmp_path / "a" / "pg_wal" / legacy_name).write_bytes(a.read_bytes())
    again = run_cli("--plan", path, "wal-push", str(tmp_path / "a" / "pg_wal" / legacy_name))
    assert again.returncode == 0 and "already archived" in again.stderr
    assert len(archived_wal(store, "pg_main", legacy_name)) == 1

    # PostgreSQL archives the old timeline's last segment as X.partial at a promotion: it is
    # an object like any other (a local store once took its key for a write in progress).
    promoted = tmp_path / "a" / "pg_wal" / f"{legacy_name}.partial"
    promoted.write_bytes(a.read_bytes())
    pushed = run_cli("--plan", path, "wal-push", str(promoted))
    assert pushed.returncode == 0, pushed.stderr
    [entry] = archived_wal(store, "pg_main", promoted.name)
    assert entry.system_identifier == str(CLUSTER_A) and not entry.is_partial


def test_parallel_push_stores_ready_segments_ahead_and_acknowledges_only_stored_ones(
    tmp_path: Path, age_key
) -> None:
    source = {
        "name": "pg_main",
        "kind": "postgres",
        "cadence": "daily",
        "owner": "team:dba",
        "host": "127.0.0.1",
        "base_backup": {"enabled": False},
        "wal_archiving": False,
    }
    plan = plan_dict([age_key[1]], [source])
    plan["encryption"]["identity_file"] = str(age_key[0])
    path = write_plan(tmp_path, plan)
    (tmp_path / "store").mkdir()
    first = fake_cluster(tmp_path / "data", CLUSTER_A, os.urandom(2048))
    pg_wal = first.parent
    (pg_wal / "archive_status").mkdir()
    names = [f"0000000100000000000000{n:02X}" for n in range(7, 13)]
    for name in names:
        (pg_wal / name).write_bytes(first.read_bytes()[:40] + os.urandom(2048))
        (pg_wal / "archive_status" / f"{name}.ready").touch()
    service = BackupService.from_path(path)
    store = service.store("local")
    pg_source = service.source("pg_main")

    # The server's call for the first: it and the next three ready ones are stored at once.
    assert ops.wal_push(service, pg_source, pg_wal / names[0], parallel=4) == "archived"
    stored = {entry.name for entry in archived_wal(store, "pg_main")}
    assert stored == set(names[:4])
    notes = pg_wal / ops.PUSHED_AHEAD_FOLDER
    assert sorted(p.name for p in notes.iterdir()) == names[1:4]
    # The server's call for the second returns at once: the store holds it.
    assert ops.wal_push(service, pg_source, pg_wal / names[1], parallel=4) == "archived ahead"
    assert not (notes / names[1]).exists()
    # A note whose object is not in the store (lost meanwhile) is not taken on trust.
    [third] = archived_wal(store, "pg_main", names[2])
    store.delete(third.key)
    assert ops.wal_push(service, pg_source, pg_wal / names[2], parallel=1) == "archived"
    assert archived_wal(store, "pg_main", names[2])

    # The store goes away: the server's call fails and nothing is noted as stored.
    (tmp_path / "store").rename(tmp_path / "store-away")
    for name in names[:4]:
        (pg_wal / "archive_status" / f"{name}.ready").unlink()
    (notes / names[3]).unlink()
    failed = run_cli("--plan", str(path), "wal-push", "--parallel", "4", str(pg_wal / names[4]))
    assert failed.returncode != 0
    assert not any(notes.iterdir())
    (tmp_path / "store-away").rename(tmp_path / "store")
    ok = run_cli("--plan", str(path), "wal-push", "--parallel", "4", str(pg_wal / names[4]))
    assert ok.returncode == 0, ok.stderr
    assert {e.name for e in archived_wal(store, "pg_main")} == set(names)
