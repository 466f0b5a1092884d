"""The engine on the local store: commit protocol, manifests, integrity, and copies that open with
standard tools alone."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from spark_backup.engine.catalog import find_orphans, list_copies
from spark_backup.engine.crypto import Recipients
from spark_backup.engine.manifest import MANIFEST_FORMAT, Manifest, manifest_key
from spark_backup.engine.pipeline import CompressionSettings, open_copy, verify_copy, write_copy
from spark_backup.engine.stores.local import PARTIAL_MARKER, LocalStore
from spark_backup.errors import CryptoError, IntegrityError, SourceError, StoreError
from spark_backup.service import BackupService
from spark_backup_tests.helpers import BytesSource, make_key


def _write(store, data: bytes, key: str, **kwargs) -> Manifest:
    store.check()  # creates a local store's folder, as a backup does
    return write_copy(
        store,
        BytesSource(data, **kwargs),
        source_name="blob",
        partition="2026-11-27",
        recipients=Recipients.from_keys([key], "test"),
        compression=CompressionSettings(level=3, threads=2),
    )


def _store_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_round_trip_and_manifest(tmp_path: Path) -> None:
    identity, public = make_key(tmp_path)
    store = LocalStore("local", tmp_path / "store")
    data = os.urandom(3 << 20) + b"config = value\n" * 200_000
    manifest = _write(store, data, public)

    raw = json.loads(store.get_bytes(manifest_key("blob", manifest.id)))
    assert raw["format"] == MANIFEST_FORMAT
    assert raw["plaintext"]["bytes"] == len(data)
    assert raw["stored"]["bytes"] == len(store.get_bytes(manifest.data_key))
    assert raw["encryption"] == {"algorithm": "age-x25519", "recipients": [public]}
    assert raw["layers"] == ["age", "zstd", "raw"]
    assert {"python", "zstandard", "pyrage", "spark-backup"} <= set(raw["tools"])
    assert raw["source_metadata"] == {"length": len(data)}
    assert "AGE-SECRET-KEY" not in json.dumps(raw)
    assert manifest.data_key.endswith(".raw.zst.age")

    from spark_backup.engine.crypto import load_identities

    with open_copy(store, manifest, load_identities(identity)) as plain:
        assert plain.read() == data
    assert verify_copy(store, manifest).bytes_read == manifest.stored.bytes


def test_copy_opens_with_age_zstd_and_tar_alone(
    service: BackupService, age_key, estate, tmp_path
) -> None:
    """The runbook's promise: Debian's age and zstd and GNU tar open a copy without our code."""
    [manifest] = service.backup("dgx_config")
    ref = service.find(manifest.id)
    data_file = ref.store.object_uri(manifest.data_key).removeprefix("file://")
    target = tmp_path / "by-hand"
    target.mkdir()
    subprocess.run(
        [
            "bash",
            "-o",
            "pipefail",
            "-c",
            f"age -d -i {age_key[0]} {data_file} | zstd -d | tar -x -C {target}",
        ],
        check=True,
    )
    restored = target / str(estate).lstrip("/")
    assert (restored / "wireguard/wg0.conf").read_text() == (
        estate / "wireguard/wg0.conf"
    ).read_text()
    assert os.readlink(restored / "nvidia/current.cfg") == "fabricmanager.cfg"
    assert not (restored / "wireguard/.wg0.conf.swp").exists()
    # and sha256sum of the stored bytes is the manifest's
    digest = subprocess.run(["sha256sum", data_file], capture_output=True, text=True, check=True)
    assert digest.stdout.split()[0] == manifest.stored.sha256


def test_rerun_adds_a_copy_beside_the_first(service: BackupService) -> None:
    [first] = service.backup("dgx_config", partition="2026-11-23")
    [second] = service.backup("dgx_config", partition="2026-11-23")
    assert first.id != second.id
    assert [r.manifest.id for r in service.copies("dgx_config")] == [first.id, second.id]
    assert all(service.verify(r).ok for r in service.copies("dgx_config"))


def test_source_failure_midway_leaves_no_copy(tmp_path: Path) -> None:
    _identity, public = make_key(tmp_path)
    store = LocalStore("local", tmp_path / "store")
    with pytest.raises(SourceError, match="device went away"):
        _write(store, os.urandom(4 << 20), public, fail_after=2 << 20)
    assert _store_files(tmp_path / "store") == []
    assert list_copies(store) == []
    good = _write(store, b"after the failure", public)
    assert [m.id for m in list_copies(store)] == [good.id]


class FailingStore(LocalStore):
    """A local store whose data upload dies after some bytes, or whose manifest write fails."""

    def __init__(self, *args, fail_data_after: int | None = None, fail_manifest: bool = False):
        super().__init__(*args)
        self.fail_data_after = fail_data_after
        self.fail_manifest = fail_manifest

    @contextmanager
    def open_write(self, key, *, lock=None):
        if self.fail_manifest and "/manifests/" in key:
            raise StoreError(f"store {self.name!r}: cannot write {key}: connection reset")
        with super().open_write(key, lock=lock) as writer:
            limit = self.fail_data_after

            class Dying:
                written = 0

                def write(self, data):
                    Dying.written += len(data)
                    if limit is not None and Dying.written > limit:
                        raise StoreError("store 'local': cannot write data: connection reset")
                    return writer.write(data)

            yield Dying()


def test_store_failure_halfway_leaves_nothing_and_next_run_succeeds(tmp_path: Path) -> None:
    _identity, public = make_key(tmp_path)
    broken = FailingStore("local", tmp_path / "store", fail_data_after=1 << 20)
    with pytest.raises(StoreError, match="connection reset"):
        _write(broken, os.urandom(4 << 20), public)
    assert _store_files(tmp_path / "store") == []  # no partial file, no manifest
    healthy = LocalStore("local", tmp_path / "store")
    manifest = _write(healthy, os.urandom(4 << 20), public)
    assert [m.id for m in list_copies(healthy)] == [manifest.id]


class StallingStore(LocalStore):
    """A local store whose first data write waits until the test lets it go."""

    def __init__(self, *args):
        super().__init__(*args)
        self.release = threading.Event()

    @contextmanager
    def open_write(self, key, *, lock=None):
        with super().open_write(key, lock=lock) as writer:
            release = self.release

            class Stalling:
                def write(self, data):
                    release.wait(timeout=30)
                    return writer.write(data)

            yield Stalling()


def test_backup_reads_only_a_few_chunks_ahead_of_a_slow_store(tmp_path: Path) -> None:
    """Reading, compression and encryption overlap, with bounded queues between them: while the
    store is stuck, the source is not read far ahead (memory stays flat)."""
    _identity, public = make_key(tmp_path)
    store = StallingStore("local", tmp_path / "store")
    source = BytesSource(os.urandom(96 << 20))
    positions: list[int] = []
    done = threading.Thread(
        target=lambda: write_copy(
            store,
            source,
            source_name="blob",
            partition="2026-11-27",
            recipients=Recipients.from_keys([public], "test"),
            compression=CompressionSettings(level=3, threads=2),
            progress=lambda n: positions.append((positions[-1] if positions else 0) + n),
        )
    )
    store.check()
    done.start()
    time.sleep(3)  # long enough for every stage to fill up and stall
    read_while_stuck = positions[-1]
    store.release.set()
    done.join(timeout=120)
    assert positions[-1] == 96 << 20
    assert read_while_stuck <= 48 << 20, read_while_stuck


def test_failed_manifest_write_removes_the_data(tmp_path: Path) -> None:
    _identity, public = make_key(tmp_path)
    store = FailingStore("local", tmp_path / "store", fail_manifest=True)
    with pytest.raises(StoreError):
        _write(store, b"x" * 1000, public)
    assert _store_files(tmp_path / "store") == []


def test_data_without_manifest_is_invisible_and_pruned_after_grace(service: BackupService) -> None:
    [manifest] = service.backup("dgx_config")
    store = service.find(manifest.id).store
    store.delete(manifest_key("dgx_config", manifest.id))  # as if the backup died before the commit
    assert service.copies("dgx_config") == []
    assert (
        find_orphans(store, service.plan.defaults.orphan_grace) == []
    )  # young: maybe still running
    import datetime as dt

    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    report = service.prune(dry_run=False, now=later)
    assert report.orphans == [f"local:{manifest.data_key}"]
    assert not store.exists(manifest.data_key)


def test_interrupted_local_write_leaves_only_a_hidden_partial(tmp_path: Path) -> None:
    store = LocalStore("local", tmp_path / "store")
    store.check()
    with pytest.raises(KeyboardInterrupt), store.open_write("blob/data/x.age") as writer:
        writer.write(b"half")
        raise KeyboardInterrupt
    assert _store_files(tmp_path / "store") == []
    with store.open_write("blob/data/x.age") as writer:
        writer.write(b"whole")
    with (
        pytest.raises(StoreError, match="already exists"),
        store.open_write("blob/data/x.age") as writer,
    ):
        writer.write(b"again")
    assert store.get_bytes("blob/data/x.age") == b"whole"


def test_corrupted_copy_fails_verify_and_restore_refuses(
    service: BackupService, age_key, tmp_path
) -> None:
    [manifest] = service.backup("dgx_config")
    ref = service.find(manifest.id)
    path = Path(ref.store.object_uri(manifest.data_key).removeprefix("file://"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    outcome = service.verify(ref)
    assert not outcome.ok and "stored bytes do not match the manifest" in outcome.error
    deep = service.verify(ref, service.identities(age_key[0]))
    assert not deep.ok
    target = tmp_path / "restore"
    with pytest.raises(IntegrityError, match=manifest.id):
        service.restore(manifest.id, target, identity_file=age_key[0])
    assert not target.exists()  # nothing published, staging and the new target removed


def test_truncated_copy_is_an_integrity_error(service: BackupService, age_key, tmp_path) -> None:
    [manifest] = service.backup("dgx_config")
    ref = service.find(manifest.id)
    path = Path(ref.store.object_uri(manifest.data_key).removeprefix("file://"))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IntegrityError):
        service.restore(manifest.id, tmp_path / "restore", identity_file=age_key[0])


def test_wrong_identity_is_a_clear_crypto_error(service: BackupService, tmp_path) -> None:
    [manifest] = service.backup("dgx_config")
    other, _ = make_key(tmp_path, "other")
    with pytest.raises(CryptoError, match="none of the given age identities opens it") as raised:
        service.restore(manifest.id, tmp_path / "restore", identity_file=other)
    assert "AGE-SECRET-KEY" not in str(raised.value)
    assert not (tmp_path / "restore").exists()


def test_malformed_identity_never_echoes_the_key(service: BackupService, tmp_path) -> None:
    [manifest] = service.backup("dgx_config")
    bad = tmp_path / "bad.key"
    bad.write_text("AGE-SECRET-KEY-1THISISNOTVALIDBUTSECRETLOOKING\n")
    with pytest.raises(
        CryptoError, match=r"bad.key: line 1 is not an age X25519 identity"
    ) as raised:
        service.restore(manifest.id, tmp_path / "restore", identity_file=bad)
    assert "SECRETLOOKING" not in str(raised.value)


def test_unknown_copy_id_and_store_listing(service: BackupService) -> None:
    from spark_backup.errors import NotFoundError

    with pytest.raises(NotFoundError, match="not a copy id"):
        service.find("nonsense")
    with pytest.raises(
        NotFoundError, match=re.escape("copy dgx_config-20260101T000000.000Z-00000000 not found")
    ):
        service.find("dgx_config-20260101T000000.000Z-00000000")


def test_manifest_with_unknown_format_is_refused(service: BackupService) -> None:
    [manifest] = service.backup("dgx_config")
    store = service.find(manifest.id).store
    path = Path(store.object_uri(manifest_key("dgx_config", manifest.id)).removeprefix("file://"))
    raw = json.loads(path.read_text())
    raw["format"] = "something-else/v9"
    path.write_text(json.dumps(raw))
    _damaged_alone(service, manifest.id, "unsupported manifest format 'something-else/v9'")


def test_partial_files_are_not_listed_and_only_stalled_own_ones_are_cleaned(tmp_path: Path) -> None:
    import datetime as dt

    from spark_backup.engine.manifest import is_copy_key

    store = LocalStore("local", tmp_path / "store")
    ours = (
        tmp_path
        / "store/blob/data"
        / f".blob-20261127T000000.000Z-0123abcd.raw.zst.age{PARTIAL_MARKER}abcd0123"
    )
    theirs = tmp_path / "store" / f".notes.txt{PARTIAL_MARKER}abcd0123"
    ours.parent.mkdir(parents=True)
    ours.write_bytes(b"partial")
    theirs.write_bytes(b"someone else's")
    assert list(store.list()) == []
    assert store.cleanup_incomplete(dt.timedelta(hours=1), is_copy_key) == []  # still fresh
    removed = store.cleanup_incomplete(dt.timedelta(0), is_copy_key)
    assert removed == [ours.relative_to(tmp_path / "store").as_posix()]
    assert not ours.exists() and theirs.exists()
    shutil.rmtree(tmp_path / "store")


def test_secrets_never_reach_child_arguments_or_environment(
    service: BackupService, age_key, monkeypatch
) -> None:
    """GNU tar and the age worker run without the key or store credentials in argv or env."""
    import subprocess as sp

    secret = next(
        line for line in age_key[0].read_text().splitlines() if line.startswith("AGE-SECRET")
    )
    monkeypatch.setenv("SPARK_BACKUP_IDENTITY", secret)
    monkeypatch.setenv("SPARK_BACKUP_S3_SECRET_ACCESS_KEY", "s3-secret-value-Zq81")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value-Zq81")
    launched = []
    real_popen = sp.Popen

    def recording_popen(args, *a, **kw):
        launched.append((args, kw.get("env")))
        return real_popen(args, *a, **kw)

    monkeypatch.setattr(sp, "Popen", recording_popen)
    [manifest] = service.backup("dgx_config")
    assert service.verify(service.find(manifest.id), service.identities()).ok
    assert {args[0] for args, _ in launched} >= {"tar"}
    assert any("spark_backup.engine.age_worker" in args for args, _ in launched)
    for args, env in launched:
        assert env is not None, args  # an explicit environment, not ours
        exposed = str(args) + str(env)
        assert secret not in exposed and "secret-value-Zq81" not in exposed


def test_prune_leaves_objects_it_did_not_write(service: BackupService) -> None:
    import datetime as dt

    [manifest] = service.backup("dgx_config")
    root = service.store("local").root
    foreign = [
        root / "mysql/data/nightly.sql",
        root / "dgx_config/data/notes.txt",
        root / "README",
        root / f"{manifest.data_key}.sha256",  # an operator's sidecar beside a live copy
        root / f"{manifest.data_key}.bak",
    ]
    for path in foreign:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not spark-backup's")
    report = service.prune(dry_run=False, now=dt.datetime.now(dt.UTC) + dt.timedelta(days=30))
    assert report.orphans == [] and report.expired == []
    assert all(path.exists() for path in foreign)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["stored"].update(bytes=-1), "manifest digests are malformed"),
        (lambda m: m["plaintext"].update(sha256="zz"), "manifest digests are malformed"),
        (lambda m: m["encryption"].update(recipients="age1x"), "is not a list of keys"),
        (lambda m: m.update(finished_at="last tuesday"), "manifest times are not ISO 8601"),
        (lambda m: m["stored"].update(bytes="12"), "manifest field stored.bytes"),
        (
            lambda m: m.update(data_key="dgx_config/data/other.tar.zst.age"),
            "does not belong to copy",
        ),
    ],
)
def test_tampered_manifests_are_refused(service: BackupService, change, message: str) -> None:
    [manifest] = service.backup("dgx_config")
    path = service.store("local").root / manifest_key("dgx_config", manifest.id)
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))
    _damaged_alone(service, manifest.id, message)


def test_a_manifest_under_another_copys_name_is_refused(service: BackupService) -> None:
    [first], [second] = service.backup("dgx_config"), service.backup("dgx_config")
    root = service.store("local").root
    (root / manifest_key("dgx_config", first.id)).write_bytes(
        (root / manifest_key("dgx_config", second.id)).read_bytes()
    )
    refs, damaged = service.listing("dgx_config")
    assert [r.manifest.id for r in refs] == [second.id]
    assert [d.copy_id for d in damaged] == [first.id]
    assert "holds the manifest of another copy" in damaged[0].error
    with pytest.raises(IntegrityError, match="holds the manifest of another copy"):
        service.find(first.id)


def test_local_store_never_recreates_a_missing_root(tmp_path: Path) -> None:
    """An unmounted backup disk must fail writes, not fill the mount point's folder."""
    store = LocalStore("local", tmp_path / "mnt" / "backups")
    with pytest.raises(StoreError, match="does not exist"), store.open_write("a/b") as writer:
        writer.write(b"x")
    assert not (tmp_path / "mnt").exists()
    store.check()  # first use creates it
    with store.open_write("a/b") as writer:
        writer.write(b"x")
    assert store.get_bytes("a/b") == b"x"


def _damaged_alone(service: BackupService, copy_id: str, message: str) -> None:
    """The copy with a damaged manifest fails, named, with ``message``; a copy made after it
    lists and verifies as usual, and a restore of the damaged one is refused."""
    [other] = service.backup("dgx_config")
    refs, damaged = service.listing("dgx_config")
    assert [r.manifest.id for r in refs] == [other.id]
    assert [d.copy_id for d in damaged] == [copy_id] and message in damaged[0].error
    assert all(service.verify(r).ok for r in refs)
    with pytest.raises(IntegrityError, match=re.escape(message)):
        service.find(copy_id)
