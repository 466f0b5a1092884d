"""Repacking the blob layer (engine/blobs/repack.py) through prune, on a real local store and on
SeaweedFS: sparse packs are rewritten and then swept, every kept version restores with every
digest checked, a prune killed between publishing the new packs and deleting the old ones
loses nothing and its rerun finishes, and a pack under an Object Lock is never rewritten or
deleted."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from spark_backup.engine.blobs import packs
from spark_backup.engine.blobs.packs import existing_packs, pack_key
from spark_backup.engine.blobs.repack import moves_prefix, read_moves
from spark_backup.engine.blobs.sweep import read_plans
from spark_backup.service import BackupService
from spark_backup.sources import blob_versions
from spark_backup_tests.helpers import llm_source, make_model_dir, plan_dict, run_cli, write_plan
from spark_backup_tests.test_llm_artifacts import (
    CHUNK_SECRET,
    _redraw,
    _tree_digests,
    restore_by_hand,
)

DAY = dt.timedelta(days=1)
TENSORS = 18


@pytest.fixture(autouse=True)
def chunk_secret(monkeypatch):
    monkeypatch.setenv("SPARK_TEST_CHUNK_KEY", CHUNK_SECRET)


@pytest.fixture(autouse=True)
def small_packs(monkeypatch):
    """Packs of about two 256 KiB tensors: a version that re-draws two tensors of three leaves
    packs that mix live and dead chunks."""
    monkeypatch.setattr(packs, "PACK_TARGET", 512 * 1024)


def _names(indexes) -> list[str]:
    return [f"base_model.layers.{i}.lora_{'AB'[i % 2]}.weight" for i in indexes]


def _two_versions(tmp_path, age_key, stores=None, **defaults):
    """An adapter backed up twice, the second time with two of every three tensors re-drawn;
    retention keeps one version."""
    model = make_model_dir(tmp_path / "adapter", tensors=TENSORS, floats=65536)
    source = llm_source("adapter", str(model), retention={"daily": 1, "weekly": 0, "monthly": 0})
    extra = {"stores": stores} if stores else {}
    if defaults:
        extra["defaults"] = defaults
    plan = write_plan(tmp_path, plan_dict([age_key[1]], [source], **extra))
    service = BackupService.from_path(plan)
    [first] = service.backup("adapter")
    _redraw(model, _names(i for i in range(TENSORS) if i % 3))
    [second] = service.backup("adapter")
    return plan, service, model, first, second


def _stored(store) -> int:
    return sum(existing_packs(store, "adapter").values())


def _restores_intact(service, version, model, target, identity) -> None:
    service.restore(version.id, target, identity_file=identity)
    assert _tree_digests(target) == _tree_digests(model)
    deep = service.verify(service.find(version.id), service.identities(identity))
    assert deep.ok, deep.error
    assert "every chunk decrypted, file and tensor digests" in deep.checks
    assert service.verify(service.find(version.id)).ok  # plain: every pack present, no key


def test_prune_repacks_sparse_packs_and_every_kept_version_restores(tmp_path, age_key):
    plan, service, model, first, second = _two_versions(tmp_path, age_key)
    store = service.store_for(service.source("adapter"))
    before = _stored(store)
    old_packs = set(existing_packs(store, "adapter"))
    now = dt.datetime.now(dt.UTC)

    # A dry run lists what --apply rewrites, with the bytes it would free, and writes nothing.
    dry = service.prune(dry_run=True, now=now, identity_file=age_key[0])
    rewritten = {p["pack"] for p in dry.repacked}
    assert rewritten and rewritten <= old_packs
    assert all(p["size"] - p["used"] >= 0.5 * p["size"] for p in dry.repacked)
    assert dry.repack_reclaimed_bytes > 0 and dry.repack_new_packs == []
    assert not list(store.list(moves_prefix("adapter")))
    shown = run_cli("--plan", str(plan), "prune", "--identity", str(age_key[0]), check=True)
    assert "would rewrite pack adapter:" in shown.stdout and "bytes reclaimed" in shown.stdout
    assert set(existing_packs(store, "adapter")) == old_packs

    report = service.prune(dry_run=False, now=now, identity_file=age_key[0])
    assert report.expired == [first.id]
    assert {p["pack"] for p in report.repacked} == rewritten
    assert report.repack_new_packs
    # The new packs and their move records are published; the old ones are only announced.
    assert rewritten <= set(existing_packs(store, "adapter"))
    announced = {packs.id_of_pack_key(k) for k in read_plans(store, "adapter").unreferenced}
    assert rewritten <= announced
    kind = service.kind_of(service.source("adapter"))
    needed = {packs.id_of_pack_key(k) for k in kind.version_refs(service.find(second.id))}
    assert not needed & rewritten
    _restores_intact(service, second, model, tmp_path / "mid", age_key[0])

    service.prune(dry_run=False, now=now + 2 * DAY, identity_file=age_key[0])
    left = set(existing_packs(store, "adapter"))
    assert not left & rewritten
    indexes = {i.key for i in store.list("adapter/pack-index/")}
    assert indexes == {packs.index_key("adapter", pid) for pid in left}
    after = _stored(store)
    # Only the kept version's chunks remain: about a third of the first version's tensors and
    # the second's own, far less than before.
    assert after < before - report.repack_reclaimed_bytes // 2
    assert (
        sum(p["size"] for p in report.repacked)
        - sum(
            existing_packs(store, "adapter")[pid.split(":")[1]] for pid in report.repack_new_packs
        )
        == report.repack_reclaimed_bytes
    )
    _restores_intact(service, second, model, tmp_path / "after", age_key[0])
    # A rerun finds nothing left to rewrite.
    again = service.prune(dry_run=False, now=now + 3 * DAY, identity_file=age_key[0])
    assert again.repacked == []


def test_the_runbook_restores_by_hand_through_move_records_after_the_sweep(tmp_path, age_key):
    """With the old packs deleted, the runbook's by-hand block (age, zstd, jq, dd) finds the
    moved chunks through the move records and restores the kept version intact."""
    _plan, service, model, _first, _second = _two_versions(tmp_path, age_key)
    store = service.store_for(service.source("adapter"))
    now = dt.datetime.now(dt.UTC)
    report = service.prune(dry_run=False, now=now, identity_file=age_key[0])
    assert report.repacked
    service.prune(dry_run=False, now=now + 2 * DAY, identity_file=age_key[0])
    assert not {p["pack"] for p in report.repacked} & set(existing_packs(store, "adapter"))

    staging = tmp_path / "by-hand"
    done = restore_by_hand(tmp_path / "store", "adapter", age_key[0], staging)
    assert done.returncode == 0, done.stderr
    assert _tree_digests(staging) == _tree_digests(model)


def test_a_version_backed_up_after_a_repack_reuses_the_new_packs(tmp_path, age_key):
    _plan, service, model, _first, _second = _two_versions(tmp_path, age_key)
    store = service.store_for(service.source("adapter"))
    now = dt.datetime.now(dt.UTC)
    report = service.prune(dry_run=False, now=now, identity_file=age_key[0])
    assert report.repacked
    (model / "notes.txt").write_text("a third version")
    [third] = service.backup("adapter")
    assert third.source_metadata["new_chunks"] <= 2  # every other chunk found in a pack
    service.prune(dry_run=False, now=now + 2 * DAY, identity_file=age_key[0])
    assert not set(existing_packs(store, "adapter")) & {p["pack"] for p in report.repacked}
    _restores_intact(service, third, model, tmp_path / "third", age_key[0])


@pytest.mark.parametrize("where", ["before the move records", "between publish and delete"])
def test_a_repack_killed_midway_loses_nothing_and_a_rerun_finishes(
    tmp_path, age_key, monkeypatch, where
):
    _plan, service, model, _first, second = _two_versions(tmp_path, age_key)
    store = service.store_for(service.source("adapter"))
    now = dt.datetime.now(dt.UTC)
    if where == "before the move records":
        real_put = type(store).put_bytes

        def dies_at_the_record(self, key, data, *args, **kwargs):
            if key.startswith(moves_prefix("adapter")):
                raise KeyboardInterrupt
            return real_put(self, key, data, *args, **kwargs)

        monkeypatch.setattr(type(store), "put_bytes", dies_at_the_record)
    else:

        def dies_before_the_sweep(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(blob_versions, "sweep", dies_before_the_sweep)
    with pytest.raises(KeyboardInterrupt):
        service.prune(dry_run=False, now=now, identity_file=age_key[0])
    monkeypatch.undo()
    monkeypatch.setenv("SPARK_TEST_CHUNK_KEY", CHUNK_SECRET)
    monkeypatch.setattr(packs, "PACK_TARGET", 512 * 1024)
    moved = bool(read_moves(store, "adapter"))
    assert moved == (where == "between publish and delete")
    # Nothing is lost: the kept version restores and verifies, whether its chunks are found in
    # the old packs (no record yet) or in the new ones (chunks in two packs meanwhile).
    _restores_intact(service, second, model, tmp_path / "mid", age_key[0])
    new_so_far = set(existing_packs(store, "adapter"))

    rerun = service.prune(
        dry_run=False, now=now + dt.timedelta(minutes=1), identity_file=age_key[0]
    )
    if where == "before the move records":
        # The rerun rewrote the same packs, reusing the chunks the killed run had stored.
        assert rerun.repacked
        assert {p.split(":")[1] for p in rerun.repack_new_packs} <= new_so_far
    else:
        assert rerun.repacked == []
    assert set(existing_packs(store, "adapter")) == new_so_far
    finish = service.prune(dry_run=False, now=now + 2 * DAY, identity_file=age_key[0])
    assert finish.shared_expired
    rewritten = {p["pack"] for p in rerun.repacked} or set(read_moves(store, "adapter"))
    assert rewritten and not set(existing_packs(store, "adapter")) & rewritten
    _restores_intact(service, second, model, tmp_path / "after", age_key[0])


def test_a_prune_without_identity_sweeps_and_follows_moves(tmp_path, age_key, monkeypatch):
    _plan, service, model, _first, second = _two_versions(tmp_path, age_key)
    store = service.store_for(service.source("adapter"))
    now = dt.datetime.now(dt.UTC)
    service.prune(dry_run=False, now=now, identity_file=age_key[0])
    moved = set(read_moves(store, "adapter"))
    # A prune that holds no identity repacks nothing but still follows the move records: the
    # old packs go, the new ones stay.
    monkeypatch.delenv("SPARK_BACKUP_IDENTITY_FILE", raising=False)
    monkeypatch.delenv("SPARK_BACKUP_IDENTITY", raising=False)
    report = service.prune(dry_run=False, now=now + 2 * DAY)
    assert report.repack_skipped and report.repacked == []
    left = set(existing_packs(store, "adapter"))
    assert moved and not left & moved
    _restores_intact(service, second, model, tmp_path / "after", age_key[0])
    # Once the version the records answer for is gone, so are the records.
    (model / "notes.txt").write_text("a third version")
    service.backup("adapter")
    service.prune(dry_run=False, now=now + 3 * DAY)
    service.prune(dry_run=False, now=now + 5 * DAY)
    assert not list(store.list(moves_prefix("adapter")))


def test_a_damaged_move_record_stops_the_sweep(tmp_path, age_key):
    _plan, service, _model, _first, _second = _two_versions(tmp_path, age_key)
    store = service.store_for(service.source("adapter"))
    now = dt.datetime.now(dt.UTC)
    service.prune(dry_run=False, now=now, identity_file=age_key[0])
    [record] = list(store.list(moves_prefix("adapter")))[:1]
    store.delete(record.key)
    store.put_bytes(record.key, b"{not json")
    before = set(existing_packs(store, "adapter"))
    # The mark cannot tell which packs the damaged record keeps: the sweep deletes nothing.
    report = service.prune(dry_run=False, now=now + 2 * DAY)
    assert report.shared_expired == []
    assert set(existing_packs(store, "adapter")) == before


def _s3_store(seaweedfs, bucket: str, monkeypatch) -> dict:
    monkeypatch.setenv("SPARK_TEST_S3_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("SPARK_TEST_S3_SECRET", seaweedfs.secret_key)
    return {
        "name": "s3",
        "kind": "s3",
        "endpoint_url": seaweedfs.endpoint_url,
        "bucket": bucket,
        "prefix": "models",
        "region_name": seaweedfs.region,
        "access_key_id_env": "SPARK_TEST_S3_KEY_ID",
        "secret_access_key_env": "SPARK_TEST_S3_SECRET",
    }


def test_on_s3_a_locked_sparse_pack_is_neither_rewritten_nor_deleted(
    tmp_path, seaweedfs, s3_lock_bucket, age_key, monkeypatch
):
    store_settings = _s3_store(seaweedfs, s3_lock_bucket, monkeypatch)
    plan, service, model, _first, second = _two_versions(tmp_path, age_key, [store_settings])
    s3 = service.store_for(service.source("adapter"))
    now = dt.datetime.now(dt.UTC)
    dry = service.prune(dry_run=True, now=now, identity_file=age_key[0])
    sparse = sorted(p["pack"] for p in dry.repacked)
    assert len(sparse) >= 2
    # One sparse pack is put under a lock (as a WORM store's lock would hold it).
    held = sparse[0]
    key = pack_key("adapter", held)
    s3.client.put_object_retention(
        Bucket=s3.bucket,
        Key=s3._full(key),
        Retention={"Mode": "GOVERNANCE", "RetainUntilDate": now + 3 * DAY},
    )
    assert s3.locked(key, now)

    report = service.prune(dry_run=False, now=now, identity_file=age_key[0])
    assert report.repack_locked == [f"adapter:{held}"]
    assert {p["pack"] for p in report.repacked} == set(sparse) - {held}
    service.prune(dry_run=False, now=now + 2 * DAY, identity_file=age_key[0])
    left = set(existing_packs(s3, "adapter"))
    assert held in left and not left & (set(sparse) - {held})
    _restores_intact(service, second, model, tmp_path / "restored", age_key[0])
    shown = json.loads(
        run_cli("--plan", str(plan), "prune", "--json", "--identity", str(age_key[0])).stdout
    )
    assert shown["repack_locked"] == [f"adapter:{held}"]


KILLED_REPACK = """
import datetime as dt, os, signal, sys
from spark_backup.engine.blobs import packs
from spark_backup.service import BackupService

packs.PACK_TARGET = 512 * 1024
packs.SEALERS = 1  # one pack stored at a time: exactly one is written when the kill comes
real_store_pack = packs.PackWriter._store_pack
stored = []

def store_then_die(self, *args):
    real_store_pack(self, *args)
    stored.append(1)
    if len(stored) == 1:  # the first new pack and its index are written: SIGKILL
        os.kill(os.getpid(), signal.SIGKILL)

packs.PackWriter._store_pack = store_then_die
service = BackupService.from_path(sys.argv[1])
service.prune(dry_run=False, now=dt.datetime.fromisoformat(sys.argv[3]), identity_file=sys.argv[2])
"""


@pytest.mark.parametrize("on", ["local", "s3"])
def test_a_prune_killed_with_sigkill_in_the_middle_of_a_repack_loses_nothing(
    tmp_path, age_key, request, monkeypatch, on
):
    import signal
    import subprocess
    import sys

    stores = None
    if on == "s3":
        seaweedfs = request.getfixturevalue("seaweedfs")
        stores = [_s3_store(seaweedfs, request.getfixturevalue("s3_bucket"), monkeypatch)]
    plan, service, model, _first, second = _two_versions(tmp_path, age_key, stores)
    store = service.store_for(service.source("adapter"))
    now = dt.datetime.now(dt.UTC)
    dry = service.prune(dry_run=True, now=now, identity_file=age_key[0])
    assert sum(p["used"] for p in dry.repacked) > 600 * 1024  # more than one new pack's worth
    before = set(existing_packs(store, "adapter"))
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_REPACK, str(plan), str(age_key[0]), now.isoformat()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # One new pack was stored, no move record: every reader still uses the old packs.
    assert len(set(existing_packs(store, "adapter")) - before) == 1
    assert not list(store.list(moves_prefix("adapter")))
    assert before <= set(existing_packs(store, "adapter"))
    _restores_intact(service, second, model, tmp_path / "mid", age_key[0])

    leftover = set(existing_packs(store, "adapter")) - before
    rerun = service.prune(dry_run=False, now=now, identity_file=age_key[0])
    assert {p["pack"] for p in rerun.repacked} == {p["pack"] for p in dry.repacked}
    # The pack the killed run stored is used, not written again.
    assert {f"adapter:{pid}" for pid in leftover} <= set(rerun.repack_new_packs)
    service.prune(dry_run=False, now=now + 2 * DAY, identity_file=age_key[0])
    assert not set(existing_packs(store, "adapter")) & {p["pack"] for p in dry.repacked}
    _restores_intact(service, second, model, tmp_path / "after", age_key[0])


def test_a_version_replicated_after_a_repack_restores_from_its_store_replica(tmp_path, age_key):
    model = make_model_dir(tmp_path / "adapter", tensors=TENSORS, floats=65536)
    retention = {"daily": 1, "weekly": 0, "monthly": 0}
    source = llm_source("adapter", str(model), retention=retention, replicate_to=["offsite"])
    target = {
        "name": "offsite",
        "kind": "store",
        "store": {"name": "offsite", "kind": "local", "path": "offsite"},
    }
    plan = write_plan(tmp_path, plan_dict([age_key[1]], [source], replication=[target]))
    service = BackupService.from_path(plan)
    service.backup("adapter")
    _redraw(model, _names(i for i in range(TENSORS) if i % 3))
    [second] = service.backup("adapter")
    now = dt.datetime.now(dt.UTC)
    service.prune(dry_run=False, now=now, identity_file=age_key[0])
    service.prune(dry_run=False, now=now + 2 * DAY, identity_file=age_key[0])
    assert read_moves(service.store_for(service.source("adapter")), "adapter")
    [outcome] = service.replicate("adapter")
    assert outcome.replicated, outcome.problem

    # The replica holds the new packs and the move records: it verifies and restores there.
    replica_plan = plan_dict(
        [age_key[1]],
        [llm_source("adapter", str(model))],
        stores=[{"name": "offsite", "kind": "local", "path": str(tmp_path / "offsite")}],
    )
    (tmp_path / "elsewhere").mkdir()
    other = BackupService.from_path(write_plan(tmp_path / "elsewhere", replica_plan))
    assert read_moves(other.store_for(other.source("adapter")), "adapter")
    _restores_intact(other, second, model, tmp_path / "from-replica", age_key[0])


def test_without_the_chunk_key_a_prune_repacks_nothing_and_says_why(tmp_path, age_key, monkeypatch):
    plan, service, _model, first, _second = _two_versions(tmp_path, age_key)
    store = service.store_for(service.source("adapter"))
    before = set(existing_packs(store, "adapter"))
    monkeypatch.delenv("SPARK_TEST_CHUNK_KEY")
    service = BackupService.from_path(plan)  # a host that holds the identity, not the key
    for dry_run in (True, False):
        report = service.prune(dry_run=dry_run, identity_file=age_key[0])
        assert report.repacked == [] and report.repack_new_packs == []
        assert any("no chunk key" in reason for reason in report.repack_skipped)
    assert report.expired == [first.id]
    assert set(existing_packs(store, "adapter")) == before
    assert not list(store.list(moves_prefix("adapter")))


@pytest.mark.parametrize("share", [0, 0.001, 1.5])
def test_a_repack_share_outside_its_range_is_refused(tmp_path, age_key, share):
    from spark_backup.errors import PlanError

    model = make_model_dir(tmp_path / "adapter")
    raw = plan_dict([age_key[1]], [llm_source("adapter", str(model))])
    raw["defaults"] = {"repack_unused": share}
    with pytest.raises(PlanError, match="repack_unused"):
        BackupService.from_path(write_plan(tmp_path, raw))


def test_a_chunk_moved_twice_is_found_through_the_chain_of_records(tmp_path):
    """Engine level, on a real local store: pack P holds the chunks of versions v and x and
    some dead ones; a repack moves v's and x's to P'; x goes, so P' is half dead and a second
    repack moves v's to P''. v's committed document still says P: its chunks are found in P''
    through both records, and a version the second record does not answer for still needs P'."""
    import copy
    import hashlib
    import random

    from pyrage import x25519

    from spark_backup.engine.blobs.keys import derive_chunk_key
    from spark_backup.engine.blobs.packs import PackWriter, read_chunks
    from spark_backup.engine.blobs.repack import plan_repack, relocate, repack, resolve_packs
    from spark_backup.engine.blobs.version import file_chunks
    from spark_backup.engine.crypto import Recipients
    from spark_backup.engine.stores.local import LocalStore
    from spark_backup_tests.helpers import make_key

    key_file, public = make_key(tmp_path / "keys")
    identities = [
        x25519.Identity.from_str(line)
        for line in key_file.read_text().splitlines()
        if line.startswith("AGE-SECRET-KEY-")
    ]
    store = LocalStore("local", tmp_path / "store")
    store.root.mkdir()
    key, recipients = derive_chunk_key(CHUNK_SECRET, "s"), Recipients((public,))
    rng = random.Random(3)
    data = [rng.randbytes(20000) for _ in range(30)]  # v: 0-9, x: 10-19, dead: 20-29
    writer = PackWriter(store, "s", key, recipients, pack_target=1 << 24)
    numbers = [writer.add(chunk) for chunk in data]
    writer.close()
    [first_pack] = writer.new_packs

    def document(indexes) -> dict:
        chunks = []
        for i in indexes:
            ref = writer.refs[numbers[i]]
            chunks.append([ref.id, ref.sha256, ref.size, *writer.location(ref.id)])
        return {"files": [{"path": "f", "chunks": chunks}]}

    committed_v, committed_x = document(range(10)), document(range(10, 20))
    now = dt.datetime.now(dt.UTC)

    def repack_once(documents, versions) -> tuple[str, str]:
        report = plan_repack(store, "s", documents, 0.3, set(), now)
        [candidate] = report.candidates
        repack(store, "s", report, versions, identities, key, recipients, 3, None, now, set())
        [new_pack] = report.new_packs
        return candidate.pack, new_pack

    old, middle = repack_once([committed_v, committed_x], ["v", "x"])
    assert old == first_pack
    moves = read_moves(store, "s")
    # x is gone: v's chunks are half of the pack they moved to.
    v_now = relocate(copy.deepcopy(committed_v), "v", moves, identities)
    assert {c[3] for c in v_now["files"][0]["chunks"]} == {middle}
    again, last = repack_once([v_now], ["v"])
    assert again == middle
    moves = read_moves(store, "s")
    assert resolve_packs("s", {pack_key("s", old): 1}, "v", moves)[0] == {
        pack_key("s", last): existing_packs(store, "s")[last]
    }
    # x is in the first record, not the second: it still needs the middle pack.
    assert set(resolve_packs("s", {pack_key("s", old): 1}, "x", moves)[0]) == {
        pack_key("s", middle)
    }
    # The old and middle packs go (as the sweep would delete them): v reads from the last one.
    store.delete(pack_key("s", old))
    store.delete(pack_key("s", middle))
    relocated = relocate(copy.deepcopy(committed_v), "v", moves, identities)
    refs = file_chunks(relocated["files"][0])
    assert {ref.pack for ref in refs} == {last}
    chunks = list(read_chunks(store, "s", refs, identities, "chain"))
    assert [hashlib.sha256(c).digest() for c in chunks] == [
        hashlib.sha256(d).digest() for d in data[:10]
    ]
