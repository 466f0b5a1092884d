"""The store contract suite, in the manner of restic's backend suite (internal/backend/test):
one set of tests that every store passes unchanged, here the local folder and S3 (a real
SeaweedFS server). It holds each store to what ``ObjectStore`` (engine/stores/base.py)
promises: create-only objects published all or nothing, streamed both ways; listings in key
order, by prefix and by folder; missing objects as ``NotFoundError``; leftovers of writes that
never finished removed only when they are ours and stalled.

A new store joins by adding a case to ``STORES``."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest

from spark_backup.engine.stores import LocalStore, ObjectStore
from spark_backup.engine.stores.config import S3StoreConfig
from spark_backup.engine.stores.s3 import MIB, S3Store
from spark_backup.errors import NotFoundError, StoreError
from spark_backup_tests.seaweedfs import SeaweedFS

KEY_ENV = "SB_CONTRACT_S3_ACCESS_KEY_ID"
SECRET_ENV = "SB_CONTRACT_S3_SECRET_ACCESS_KEY"
# Bigger than S3's smallest part (5 MiB), so S3 streams it as a multipart upload.
LARGE = 6 * MIB + 123


def local_store(request: pytest.FixtureRequest) -> ObjectStore:
    tmp_path = request.getfixturevalue("tmp_path")
    store = LocalStore("contract", tmp_path / "store")
    store.check()
    return store


def s3_store(request: pytest.FixtureRequest) -> ObjectStore:
    seaweedfs: SeaweedFS = request.getfixturevalue("seaweedfs")
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setenv(KEY_ENV, seaweedfs.access_key)
    monkeypatch.setenv(SECRET_ENV, seaweedfs.secret_key)
    bucket = seaweedfs.make_bucket(f"contract-{uuid.uuid4().hex[:16]}")
    store = S3Store.from_config(
        S3StoreConfig(
            name="contract",
            kind="s3",
            bucket=bucket,
            prefix="under/a/prefix",
            endpoint_url=seaweedfs.endpoint_url,
            region_name=seaweedfs.region,
            access_key_id_env=KEY_ENV,
            secret_access_key_env=SECRET_ENV,
            part_size_mb=5,
            max_attempts=1,
        )
    )
    store.check()
    return store


STORES: dict[str, Callable[[pytest.FixtureRequest], ObjectStore]] = {
    "local": local_store,
    "s3": s3_store,
}


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest) -> ObjectStore:
    return STORES[request.param](request)


def keys(store: ObjectStore, prefix: str = "") -> list[str]:
    return [info.key for info in store.list(prefix)]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Abandoned:
    """A write left open halfway, as a killed process leaves it; closed (failed) at the end."""

    def __init__(self, store: ObjectStore, key: str, data: bytes):
        self._context: AbstractContextManager = store.open_write(key)
        self._context.__enter__().write(data)

    def close(self) -> None:
        error = RuntimeError("killed")
        self._context.__exit__(RuntimeError, error, None)


@pytest.fixture
def abandon(store: ObjectStore) -> Iterator[Callable[[str, bytes], Abandoned]]:
    opened: list[Abandoned] = []

    def make(key: str, data: bytes) -> Abandoned:
        opened.append(Abandoned(store, key, data))
        return opened[-1]

    yield make
    for write in opened:
        write.close()


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 70_000, LARGE], ids=["empty", "byte", "small", "large"])
def test_streamed_round_trip(store: ObjectStore, size: int) -> None:
    data = os.urandom(size)
    with store.open_write("src/data/blob") as writer:
        for start in range(0, size, MIB + 7):
            writer.write(data[start : start + MIB + 7])
    read = bytearray()
    with store.open_read("src/data/blob") as reader:
        while chunk := reader.read(MIB):
            read += chunk
    assert sha256(bytes(read)) == sha256(data)
    assert store.get_bytes("src/data/blob") == data
    [info] = store.list("src/data/blob")
    assert info.size == size
    now = dt.datetime.now(dt.UTC)
    assert info.modified.tzinfo is not None
    assert now - dt.timedelta(minutes=5) < info.modified <= now + dt.timedelta(minutes=5)


def test_put_and_get_bytes(store: ObjectStore) -> None:
    store.put_bytes("a/b/c.json", b'{"x": 1}\n')
    assert store.get_bytes("a/b/c.json") == b'{"x": 1}\n'
    assert store.exists("a/b/c.json")


def test_uris_name_the_object(store: ObjectStore) -> None:
    store.put_bytes("a/b", b"x")
    assert store.object_uri("a/b").startswith(store.uri)
    assert store.object_uri("a/b").endswith("/a/b")


# --- missing objects and invalid keys -----------------------------------------------------------


def test_missing_objects_are_not_found(store: ObjectStore) -> None:
    with pytest.raises(NotFoundError, match="object no/such/key not found"):
        store.get_bytes("no/such/key")
    with pytest.raises(NotFoundError, match="object no/such/key not found"):  # noqa: SIM117
        with store.open_read("no/such/key"):
            pass
    with pytest.raises(NotFoundError):
        store.lock_of("no/such/key")
    assert not store.exists("no/such/key")
    assert not store.locked("no/such/key")
    assert keys(store, "no/") == []
    assert store.list_folders("no/") == []
    store.delete("no/such/key")  # deleting what is not there is no error


@pytest.mark.parametrize("key", ["../escape", "/absolute", "a//b", "a/./b", "a/../b", "", "a b"])
def test_invalid_keys_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(StoreError, match="invalid object key"):
        store.put_bytes(key, b"x")
    with pytest.raises(StoreError, match="invalid object key"):
        store.get_bytes(key)
    with pytest.raises(StoreError, match="invalid object key"):
        store.delete(key)
    assert keys(store) == []


# --- create-only, all or nothing ----------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, LARGE], ids=["small", "large"])
def test_objects_are_create_only(store: ObjectStore, size: int) -> None:
    original = os.urandom(size)
    store.put_bytes("copy", original)
    with pytest.raises(StoreError, match="object copy already exists"):
        store.put_bytes("copy", os.urandom(size))
    assert store.get_bytes("copy") == original


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("size", [1000, LARGE], ids=["small", "large"])
def test_failed_write_publishes_nothing(store: ObjectStore, error: type, size: int) -> None:
    with pytest.raises(error), store.open_write("src/data/failed") as writer:
        writer.write(os.urandom(size))
        raise error("source failed")
    assert not store.exists("src/data/failed")
    assert keys(store) == [] and store.list_folders() == []
    store.put_bytes("src/data/failed", b"the key is still free")
    assert store.get_bytes("src/data/failed") == b"the key is still free"


def test_a_write_in_progress_is_invisible(store: ObjectStore) -> None:
    with store.open_write("src/data/running") as writer:
        writer.write(os.urandom(LARGE))
        assert not store.exists("src/data/running")
        assert keys(store) == [] and store.list_folders() == []
        with pytest.raises(NotFoundError):
            store.get_bytes("src/data/running")
    assert keys(store) == ["src/data/running"]


# --- listings -----------------------------------------------------------------------------------

KEYS = ["b/2", "a/10", "a1/x", "a/1", "b/sub/deep/3", "top"]


def test_list_is_in_key_order_and_by_prefix(store: ObjectStore) -> None:
    for key in KEYS:
        store.put_bytes(key, key.encode())
    assert keys(store) == sorted(KEYS)
    assert keys(store, "a/") == ["a/1", "a/10"]
    assert keys(store, "a") == ["a/1", "a/10", "a1/x"]  # a prefix is a string, not a folder
    assert keys(store, "a/1") == ["a/1", "a/10"]
    assert keys(store, "b/") == ["b/2", "b/sub/deep/3"]
    assert keys(store, "b/sub/deep/3") == ["b/sub/deep/3"]
    assert keys(store, "c/") == []
    assert {info.key: info.size for info in store.list()} == {k: len(k) for k in KEYS}


def test_list_folders_names_the_folders_directly_below(store: ObjectStore) -> None:
    for key in KEYS:
        store.put_bytes(key, key.encode())
    assert store.list_folders() == ["a", "a1", "b"]  # "top" is an object, not a folder
    assert store.list_folders("b/") == ["sub"]
    assert store.list_folders("b/sub/") == ["deep"]
    assert store.list_folders("a/") == []
    assert store.list_folders("c/") == []
    with pytest.raises(StoreError, match="invalid folder"):
        store.list_folders("b")


def test_delete_removes_the_object_and_an_emptied_folder(store: ObjectStore) -> None:
    store.put_bytes("gone/one", b"1")
    store.put_bytes("kept/one", b"1")
    store.delete("gone/one")
    assert not store.exists("gone/one")
    with pytest.raises(NotFoundError):
        store.get_bytes("gone/one")
    assert keys(store) == ["kept/one"]
    # SeaweedFS keeps an emptied folder's entry (AWS does not): it may be named, holding nothing.
    assert store.list_folders() in (["kept"], ["gone", "kept"])
    assert keys(store, "gone/") == []
    store.put_bytes("gone/one", b"written again")  # a deleted key can be written again
    assert store.get_bytes("gone/one") == b"written again"


# --- locks --------------------------------------------------------------------------------------


def test_an_unlocked_store_reports_no_lock(store: ObjectStore) -> None:
    store.put_bytes("plain", b"x")
    assert store.default_lock is None
    assert store.lock_of("plain") is None
    assert not store.locked("plain")


# --- leftovers of writes that never finished ----------------------------------------------------


def test_cleanup_removes_only_stalled_writes_of_owned_keys(store: ObjectStore, abandon) -> None:
    abandon("ours/data/killed", os.urandom(LARGE))
    abandon("theirs/data/killed", os.urandom(LARGE))
    assert keys(store) == [] and store.list_folders() == []  # a killed write is no object

    def owned(key: str) -> bool:
        return key.startswith("ours/")

    assert store.cleanup_incomplete(dt.timedelta(hours=1), owned) == []  # maybe still running
    removed = store.cleanup_incomplete(dt.timedelta(0), owned)
    assert len(removed) == 1 and "ours/data/" in removed[0] and "killed" in removed[0]
    assert store.cleanup_incomplete(dt.timedelta(0), owned) == []
    assert [k for k in store.cleanup_incomplete(dt.timedelta(0), lambda key: True) if "theirs" in k]
