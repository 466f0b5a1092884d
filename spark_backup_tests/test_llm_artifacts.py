"""The llm_artifacts kind and the blob layer under it, on a real local store and on SeaweedFS:
versions that share chunks, restores checked file by file, bad input refused in one line,
chunks a version needs never pruned, and a missing chunk named with every version it breaks."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
import struct
from itertools import pairwise
from pathlib import Path

import pyrage
import pytest
import zstandard

from spark_backup.engine.blobs import chunker, packs
from spark_backup.engine.blobs.keys import derive_chunk_key
from spark_backup.engine.blobs.packs import existing_packs, known_chunks, pack_key
from spark_backup.engine.blobs.sweep import read_plans
from spark_backup.errors import IntegrityError, SourceError
from spark_backup.service import BackupService
from spark_backup.sources.llm_artifacts.kind import read_document
from spark_backup_tests.helpers import (
    llm_source,
    make_model_dir,
    plan_dict,
    run_cli,
    write_plan,
    write_safetensors,
)

CHUNK_SECRET = "test-chunk-secret-0123456789abcdef"
DAY = dt.timedelta(days=1)


@pytest.fixture(autouse=True)
def chunk_secret(monkeypatch):
    monkeypatch.setenv("SPARK_TEST_CHUNK_KEY", CHUNK_SECRET)


@pytest.fixture
def one_chunk_packs(monkeypatch):
    """Packs of one chunk each: prune at pack granularity then frees what a version alone had."""
    monkeypatch.setattr(packs, "PACK_TARGET", 1)


def _packed(store, scope: str) -> set[str]:
    """The pack keys of a scope."""
    return {pack_key(scope, pid) for pid in existing_packs(store, scope)}


def _plan(tmp_path: Path, public: str, model: Path, **extra) -> Path:
    source = llm_source("adapter", str(model), retention={"daily": 1, "weekly": 0, "monthly": 0})
    return write_plan(tmp_path, plan_dict([public], [{**source, **extra}]))


def _redraw(model: Path, names: list[str], seed: int = 7) -> None:
    """Re-draw some tensors of the adapter's weights in place (same shapes)."""
    from spark_backup.engine.blobs.safetensors import read_header

    path = model / "adapter_model.safetensors"
    rng = random.Random(seed)
    with open(path, "r+b") as handle:
        header = read_header(handle, path.stat().st_size, str(path))
        for tensor in header.tensors:
            if tensor.name in names:
                handle.seek(tensor.begin)
                handle.write(rng.randbytes(tensor.end - tensor.begin))


def _tree_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def restore_by_hand(store: Path, source: str, key: Path, staging: Path):
    """Run the llm_artifacts runbook's by-hand block (age, zstd, jq, dd) on the newest version
    of ``source``; returns the finished process (the caller checks it)."""
    import os
    import subprocess

    from spark_backup_tests.test_runbooks import DOCS, fenced_blocks

    (script,) = [
        b
        for b in fenced_blocks(DOCS / "runbooks" / "llm_artifacts.md", "bash")
        if b.startswith("# What to restore")
    ]
    env = {"STORE": str(store), "SOURCE": source, "KEY": str(key), "STAGING": str(staging)}
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_versions_share_chunks_and_each_restores(tmp_path, age_key):
    model = make_model_dir(tmp_path / "adapter", tensors=20, floats=65536)  # 5 MiB of weights
    plan = _plan(tmp_path, age_key[1], model)
    service = BackupService.from_path(plan)
    [first] = service.backup("adapter")
    original = _tree_digests(model)
    _redraw(model, ["base_model.layers.3.lora_B.weight"])  # one tensor of 20: 256 KiB
    [second] = service.backup("adapter")

    meta1, meta2 = first.source_metadata, second.source_metadata
    assert meta1["label"] == "base=meta-llama/Llama-3.1-8B r=16 run=run-42"
    assert meta1["tensors"] == 20 and meta1["version_digest"] != meta2["version_digest"]
    # Cut at tensor boundaries: only the re-drawn tensor's chunks are new (plus the tiny
    # version-independent rest, which is reused).
    assert meta2["added_bytes"] <= 1.2 * 65536 * 4 + 4096, meta2
    assert meta2["new_chunks"] <= 8

    listed = run_cli("--plan", str(plan), "versions", "adapter", "--json", check=True)
    rows = json.loads(listed.stdout)
    assert [r["id"] for r in rows] == [first.id, second.id]
    assert rows[0]["digest"] == meta1["version_digest"] and rows[1]["label"] == meta2["label"]

    target = tmp_path / "restored-v1"
    summary = service.restore(first.id, target, identity_file=age_key[0])
    assert summary["version_digest"] == meta1["version_digest"]
    assert _tree_digests(target) == original
    target2 = tmp_path / "restored-v2"
    service.restore(second.id, target2, identity_file=age_key[0])
    assert _tree_digests(target2) == _tree_digests(model)

    deep = service.verify(service.find(second.id), service.identities(age_key[0]))
    assert deep.ok, deep.error
    assert "every chunk decrypted, file and tensor digests" in deep.checks


def test_a_restore_opens_the_version_document_with_the_worker_started_ahead(
    tmp_path, age_key, worker_starts
):
    """`spark-backup restore` starts an age worker while it reads the plan: the version
    document is decrypted by that worker, not by a second interpreter started for it."""
    from spark_backup.engine import age_worker

    model = make_model_dir(tmp_path / "adapter", tensors=4, floats=4096)
    service = BackupService.from_path(_plan(tmp_path, age_key[1], model))
    [version] = service.backup("adapter")
    before = len(worker_starts)
    with age_worker.AgeWorker() as worker:
        worker.start()
        service.restore(version.id, tmp_path / "back", identity_file=age_key[0], worker=worker)
        assert worker.identities is not None  # it was given the keys and used
    assert len(worker_starts) == before + 1
    assert _tree_digests(tmp_path / "back") == _tree_digests(model)


def test_a_restore_into_tmpfs_sets_sizes_without_zeroing_pages_first(tmp_path, age_key):
    """On tmpfs ``posix_fallocate`` would allocate and zero every page before the reading
    threads overwrite them: there the restore only sets each file's size; elsewhere it still
    reserves the blocks (a full disk fails before the first write)."""
    import os
    import tempfile

    from spark_backup.sources.blob_versions import _in_memory, _preallocate

    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm here")
    with tempfile.TemporaryDirectory(dir=shm) as memory:
        fd = os.open(Path(memory) / "f", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            if not _in_memory(fd):
                pytest.skip("/dev/shm is not tmpfs here")
            _preallocate(fd, 4 << 20)
            assert os.fstat(fd).st_size == 4 << 20 and os.fstat(fd).st_blocks == 0
        finally:
            os.close(fd)
        model = make_model_dir(tmp_path / "adapter", tensors=4, floats=65536)
        service = BackupService.from_path(_plan(tmp_path, age_key[1], model))
        [version] = service.backup("adapter")
        service.restore(version.id, Path(memory) / "back", identity_file=age_key[0])
        assert _tree_digests(Path(memory) / "back") == _tree_digests(model)
    fd = os.open(tmp_path / "on-disk", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        if not _in_memory(fd):
            _preallocate(fd, 4 << 20)
            assert os.fstat(fd).st_size == 4 << 20
            assert os.fstat(fd).st_blocks * 512 >= 4 << 20  # reserved (ext4, xfs, btrfs)
    finally:
        os.close(fd)


def test_equal_chunks_of_two_sources_get_unrelated_ids(tmp_path, age_key):
    model = make_model_dir(tmp_path / "adapter")
    sources = [llm_source("one", str(model)), llm_source("two", str(model))]
    service = BackupService.from_path(write_plan(tmp_path, plan_dict([age_key[1]], sources)))
    service.backup("one")
    service.backup("two")
    store = service.store_for(service.source("one"))
    one = known_chunks(store, "one", derive_chunk_key(CHUNK_SECRET, "one"))[0]
    two = known_chunks(store, "two", derive_chunk_key(CHUNK_SECRET, "two"))[0]
    assert len(one) == len(two) > 0 and not set(one) & set(two)
    # A source's pack index does not open under another source's key.
    assert known_chunks(store, "one", derive_chunk_key(CHUNK_SECRET, "two"))[0] == {}
    # and no id is the plain sha256 of a chunk
    with open(model / "tokenizer.json", "rb") as handle:
        plain = hashlib.sha256(handle.read()).hexdigest()
    assert plain not in one


def test_chunks_zstd_cannot_shrink_are_stored_in_raw_frames(tmp_path, age_key):
    """Random weights go into frames of raw blocks, uncompressed (the chunk's bytes plus a
    9-byte frame header and 3 bytes per 128 KiB block); compressible files are compressed; a
    restore gives both back, and ``zstd -d`` opens either kind of frame."""
    import subprocess

    model = make_model_dir(tmp_path / "adapter")
    (model / "notes.txt").write_bytes(b"rank 64, alpha 16, dropout 0.05\n" * 20_000)
    service = BackupService.from_path(_plan(tmp_path, age_key[1], model))
    [version] = service.backup("adapter")
    identities = service.identities(age_key[0])
    document = read_document(service.find(version.id), identities)
    files = {f["path"]: f for f in document["files"]}
    weights = [c for c in files["adapter_model.safetensors"]["chunks"] if c[2] > packs.SAMPLE]
    assert weights and all(
        length == size + 9 + 3 * -(-size // (128 * 1024))
        for _cid, _sha, size, _pid, _offset, length in weights
    )
    notes = files["notes.txt"]["chunks"]
    assert sum(c[5] for c in notes) < files["notes.txt"]["size"] // 20
    _cid, _sha, size, pid, offset, length = weights[0]
    frames = pyrage.decrypt(
        (tmp_path / "store" / pack_key("adapter", pid)).read_bytes(), identities
    )
    raw = subprocess.run(
        ["zstd", "-dc"], input=frames[offset : offset + length], check=True, capture_output=True
    ).stdout
    assert hashlib.sha256(raw).hexdigest() == _sha and len(raw) == size
    service.restore(version.id, tmp_path / "back", identity_file=age_key[0])
    assert _tree_digests(tmp_path / "back") == _tree_digests(model)


def test_packs_open_with_standard_tools(tmp_path, age_key, monkeypatch):
    """A pack is one age file of concatenated zstd frames: ``age -d | zstd -d`` gives its chunks
    back in order, and ``dd`` of a chunk's offset and length gives one chunk."""
    import subprocess

    monkeypatch.setattr(packs, "PACK_TARGET", 200_000)  # several packs

    model = make_model_dir(tmp_path / "adapter")
    service = BackupService.from_path(_plan(tmp_path, age_key[1], model))
    [version] = service.backup("adapter")
    store_root = tmp_path / "store"
    data = store_root / version.data_key
    document = json.loads(
        subprocess.run(
            f"age -d -i {age_key[0]} < {data} | zstd -dc",
            shell=True,
            check=True,
            capture_output=True,
        ).stdout
    )
    entry = next(f for f in document["files"] if f["path"] == "adapter_model.safetensors")
    used = list(dict.fromkeys(chunk[3] for chunk in entry["chunks"]))
    assert len(used) > 2
    # A whole pack: every chunk in it, in order.
    whole = subprocess.run(
        f"age -d -i {age_key[0]} < {store_root / pack_key('adapter', used[1])} | zstd -dc",
        shell=True,
        check=True,
        capture_output=True,
    ).stdout
    # One chunk at a time, by offset and length.
    plain = {
        cid: subprocess.run(
            f"age -d -i {age_key[0]} < {store_root / pack_key('adapter', pid)} | "
            f"dd bs=64K iflag=fullblock,skip_bytes,count_bytes skip={offset} count={length} status=none | "
            "zstd -dc",
            shell=True,
            check=True,
            capture_output=True,
        ).stdout
        for cid, _sha, _size, pid, offset, length in entry["chunks"]
    }
    rebuilt = b"".join(plain[chunk[0]] for chunk in entry["chunks"])
    assert hashlib.sha256(rebuilt).hexdigest() == entry["sha256"]
    assert rebuilt == (model / "adapter_model.safetensors").read_bytes()
    in_pack = sorted((c for c in entry["chunks"] if c[3] == used[1]), key=lambda c: c[4])
    assert whole == b"".join(plain[c[0]] for c in in_pack)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("length", "header length"),
        ("json", "not JSON"),
        ("offsets", "run past the end"),
        ("shape", "needs"),
    ],
)
def test_a_lying_safetensors_header_is_one_line_and_no_copy(tmp_path, age_key, damage, message):
    model = make_model_dir(tmp_path / "adapter")
    path = model / "adapter_model.safetensors"
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    name = next(k for k in header if k != "__metadata__")
    if damage == "length":
        raw = struct.pack("<Q", len(raw) * 2) + raw[8:]
    elif damage == "json":
        raw = raw[:8] + b"{" * length + raw[8 + length :]
    else:
        if damage == "offsets":
            header[name]["data_offsets"] = [o + 10**9 for o in header[name]["data_offsets"]]
        else:
            header[name]["shape"] = [3, 3]
        body = json.dumps(header, separators=(",", ":")).encode()
        body += b" " * (length - len(body))
        raw = raw[:8] + body[:length] + raw[8 + length :]
    path.write_bytes(raw)
    plan = _plan(tmp_path, age_key[1], model)
    result = run_cli("--plan", str(plan), "backup", "adapter")
    assert result.returncode == SourceError.exit_code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "adapter_model.safetensors" in lines[0] and message in lines[0]
    assert BackupService.from_path(plan).copies("adapter") == []


def test_a_model_directory_changing_during_backup_leaves_no_copy(tmp_path, age_key, monkeypatch):
    model = make_model_dir(tmp_path / "adapter")
    service = BackupService.from_path(_plan(tmp_path, age_key[1], model))
    real = chunker.iter_blocks

    def training_writes_meanwhile(handle, regions, cdc=None):
        for n, item in enumerate(real(handle, regions, cdc)):
            if n == 1:  # a trainer saves a new checkpoint file while the backup reads
                (model / "adapter_model.safetensors").touch()
                (model / "optimizer.pt").write_bytes(b"new")
            yield item

    monkeypatch.setattr(chunker, "iter_blocks", training_writes_meanwhile)
    with pytest.raises(SourceError, match="changed"):
        service.backup("adapter")
    assert service.copies("adapter") == []
    monkeypatch.setattr(chunker, "iter_blocks", real)
    assert len(service.backup("adapter")) == 1  # once quiet, the next backup succeeds


def test_a_missing_chunk_names_every_version_it_breaks(tmp_path, age_key):
    model = make_model_dir(tmp_path / "adapter")
    plan = _plan(tmp_path, age_key[1], model, retention={"daily": 5, "weekly": 0, "monthly": 0})
    service = BackupService.from_path(plan)
    [first] = service.backup("adapter")
    (model / "notes.txt").write_text("second version")
    [second] = service.backup("adapter")
    # The pack of the weights, shared by both versions, vanishes from the store.
    document = read_document(service.find(second.id), service.identities(age_key[0]))
    weights = next(f for f in document["files"] if f["path"] == "adapter_model.safetensors")
    (tmp_path / "store" / pack_key("adapter", weights["chunks"][2][3])).unlink()

    result = run_cli("--plan", str(plan), "verify", "adapter", "--json")
    assert result.returncode == IntegrityError.exit_code
    outcomes = {row["copy_id"]: row for row in json.loads(result.stdout)}
    for version in (first, second):
        error = outcomes[version.id]["error"]
        assert "missing" in error and first.id in error and second.id in error
    with pytest.raises(IntegrityError, match="missing"):
        service.restore(second.id, tmp_path / "never", identity_file=age_key[0])
    assert not (tmp_path / "never").exists()


def test_a_chunk_with_other_bytes_fails_deep_verify_and_the_drill(tmp_path, age_key):
    model = make_model_dir(tmp_path / "adapter")
    service = BackupService.from_path(_plan(tmp_path, age_key[1], model))
    [version] = service.backup("adapter")
    identities = service.identities(age_key[0])
    document = read_document(service.find(version.id), identities)
    weights = next(f for f in document["files"] if f["path"] == "adapter_model.safetensors")
    _cid, _sha, size, pid, offset, length = weights["chunks"][-1]
    # Someone who knows the public recipient swaps a chunk in its pack for other bytes of its
    # size, and stores the pack under its old name (its sha256 now differs: caught) ...
    path = tmp_path / "store" / pack_key("adapter", pid)
    frames = pyrage.decrypt(path.read_bytes(), identities)
    plain = bytearray(
        zstandard.ZstdDecompressor().decompress(
            frames[offset : offset + length], max_output_size=size
        )
    )
    plain[100] ^= 0xFF
    frame = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(bytes(plain))
    forged_frames = frames[:offset] + frame + frames[offset + length :]
    recipient = pyrage.x25519.Recipient.from_str(age_key[1])
    path.unlink()
    path.write_bytes(pyrage.encrypt(forged_frames, [recipient]))
    ref = service.find(version.id)
    deep = service.verify(ref, identities)
    assert not deep.ok and "damaged" in deep.error
    # ... or rewrites the version's references to a pack named by the forged bytes' sha256:
    # the chunk's own digest catches it.
    forged = path.read_bytes()
    path.unlink()
    new_pid = hashlib.sha256(forged).hexdigest()
    new_path = tmp_path / "store" / pack_key("adapter", new_pid)
    new_path.parent.mkdir(parents=True, exist_ok=True)
    new_path.write_bytes(forged)
    from spark_backup.engine.blobs.packs import PackCache

    cache = PackCache(service.store_for(service.source("adapter")), "adapter", identities)
    from spark_backup.engine.blobs.chunks import ChunkRef
    from spark_backup.engine.blobs.packs import read_chunks

    forged_ref = ChunkRef(_cid, _sha, size, new_pid, offset, len(frame))
    with pytest.raises(IntegrityError, match="does not hold the bytes"):
        list(read_chunks(cache.store, "adapter", [forged_ref], identities, "forged", cache))
    kind = service.kind_of(service.source("adapter"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = kind.semantic_check(service, ref, identities, scratch)
    assert not result.passed and list(scratch.iterdir()) == []


def test_the_semantic_check_reads_every_tensor(tmp_path, age_key):
    model = make_model_dir(tmp_path / "adapter", tensors=7)
    service = BackupService.from_path(_plan(tmp_path, age_key[1], model))
    [version] = service.backup("adapter")
    kind = service.kind_of(service.source("adapter"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = kind.semantic_check(
        service, service.find(version.id), service.identities(age_key[0]), scratch
    )
    assert result.passed, result.description
    assert result.metrics["tensors"] == 7 and result.metrics["tokenizers"] == 1
    assert result.metrics["nemo_members"] == 1


def _only_in(service, version_id: str, other_id: str, identity: Path) -> set[str]:
    kind = service.kind_of(service.source("adapter"))
    refs = [kind._refs(service.find(i)) for i in (version_id, other_id)]
    return set(refs[0]) - set(refs[1])


def test_prune_sweeps_only_chunks_no_version_needs_after_the_grace(
    tmp_path, age_key, one_chunk_packs
):
    model = make_model_dir(tmp_path / "adapter", tensors=10)
    plan = _plan(tmp_path, age_key[1], model)
    service = BackupService.from_path(plan)
    store = service.store_for(service.source("adapter"))
    [first] = service.backup("adapter")
    _redraw(model, ["base_model.layers.0.lora_A.weight", "base_model.layers.5.lora_B.weight"])
    [second] = service.backup("adapter")
    only_first = _only_in(service, first.id, second.id, age_key[0])
    assert only_first

    now = dt.datetime.now(dt.UTC)
    report = service.prune(dry_run=False, now=now)
    assert report.expired == [first.id]
    # Announced, not yet deleted: a backup running now could still be reusing them.
    assert report.shared_expired == []
    assert only_first <= set(read_plans(store, "adapter").unreferenced)
    assert only_first <= _packed(store, "adapter")

    # A prune interrupted halfway through its deletions...
    real_delete = type(store).delete
    calls = {"n": 0}

    def dies_after_two(self, key):
        if "/packs/" in key:
            calls["n"] += 1
            if calls["n"] > 2:
                raise KeyboardInterrupt
        return real_delete(self, key)

    later = now + 2 * DAY
    type(store).delete = dies_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            service.prune(dry_run=False, now=later)
    finally:
        type(store).delete = real_delete
    assert calls["n"] == 3
    # ...lost nothing: the kept version restores and deep-verifies.
    service.restore(second.id, tmp_path / "mid", identity_file=age_key[0])
    assert _tree_digests(tmp_path / "mid") == _tree_digests(model)
    # The rerun finishes: every chunk only the expired version had is gone, no other.
    rerun = service.prune(dry_run=False, now=later + dt.timedelta(minutes=1))
    left = _packed(store, "adapter")
    assert not (only_first & left)
    # No index is left without its pack, none of a kept pack is gone.
    indexes = {i.key for i in store.list("adapter/pack-index/")}
    assert indexes == {packs.index_key("adapter", packs.id_of_pack_key(k)) for k in left}
    assert set(service.kind_of(service.source("adapter"))._refs(service.find(second.id))) <= left
    assert rerun.shared_expired
    deep = service.verify(service.find(second.id), service.identities(age_key[0]))
    assert deep.ok, deep.error


def test_a_backup_never_reuses_a_pack_being_pruned(tmp_path, age_key, one_chunk_packs, monkeypatch):
    model = make_model_dir(tmp_path / "adapter", tensors=6)
    service = BackupService.from_path(_plan(tmp_path, age_key[1], model))
    store = service.store_for(service.source("adapter"))
    original = (model / "adapter_model.safetensors").read_bytes()
    service.backup("adapter")
    _redraw(model, ["base_model.layers.2.lora_A.weight"])
    service.backup("adapter")
    service.prune(dry_run=False)  # the first version expires; its own packs are announced
    doomed = set(read_plans(store, "adapter").unreferenced)
    assert doomed
    (model / "adapter_model.safetensors").write_bytes(original)  # training rolled back
    # A backup that starts after the announcement writes those chunks again.
    [third] = service.backup("adapter")
    kind = service.kind_of(service.source("adapter"))
    assert not set(kind._refs(service.find(third.id))) & doomed

    # One that started before it (it read the pack indexes, then a prune announced) is refused.
    from spark_backup.engine.blobs import version as reader_module

    real_doomed = reader_module.doomed_packs
    calls = {"n": 0}

    def announced_meanwhile(store_, scope):
        calls["n"] += 1
        if calls["n"] == 1:
            return set()  # at the start: nothing announced yet
        return {packs.id_of_pack_key(k) for k in kind._refs(service.find(third.id))}

    monkeypatch.setattr(reader_module, "doomed_packs", announced_meanwhile)
    (model / "notes.txt").write_text("a fourth version")
    with pytest.raises(SourceError, match="being pruned"):
        service.backup("adapter")
    monkeypatch.setattr(reader_module, "doomed_packs", real_doomed)
    assert [c.manifest.id for c in service.copies("adapter")][-1] == third.id


def test_versions_through_s3(tmp_path, seaweedfs, s3_bucket, age_key, monkeypatch):
    monkeypatch.setenv("SPARK_TEST_S3_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("SPARK_TEST_S3_SECRET", seaweedfs.secret_key)
    store = {
        "name": "s3",
        "kind": "s3",
        "endpoint_url": seaweedfs.endpoint_url,
        "bucket": s3_bucket,
        "prefix": "models",
        "region_name": seaweedfs.region,
        "access_key_id_env": "SPARK_TEST_S3_KEY_ID",
        "secret_access_key_env": "SPARK_TEST_S3_SECRET",
    }
    model = make_model_dir(tmp_path / "adapter", tensors=8)
    plan = write_plan(
        tmp_path,
        plan_dict([age_key[1]], [llm_source("adapter", str(model))], stores=[store]),
    )
    service = BackupService.from_path(plan)
    [first] = service.backup("adapter")
    _redraw(model, ["base_model.layers.1.lora_B.weight"])
    [second] = service.backup("adapter")
    assert second.source_metadata["new_chunks"] < first.source_metadata["new_chunks"]
    for version in (first, second):
        assert service.verify(service.find(version.id), service.identities(age_key[0])).ok
    service.restore(second.id, tmp_path / "restored", identity_file=age_key[0])
    assert _tree_digests(tmp_path / "restored") == _tree_digests(model)


def test_a_chunk_secret_too_short_is_refused(tmp_path, age_key, monkeypatch):
    monkeypatch.setenv("SPARK_TEST_CHUNK_KEY", "short")
    model = make_model_dir(tmp_path / "adapter")
    result = run_cli("--plan", str(_plan(tmp_path, age_key[1], model)), "backup", "adapter")
    assert result.returncode == SourceError.exit_code and "chunk_key" in result.stderr


def test_safetensors_boundaries_cut_chunks(tmp_path):
    """Each tensor starts a chunk: one re-drawn tensor never shares a chunk with a neighbour."""
    import io

    from spark_backup.engine.blobs.safetensors import read_header

    rng = random.Random(3)
    path = write_safetensors(
        tmp_path / "w.safetensors",
        {f"t{i}": ("F32", [1000 + i], rng.randbytes(4 * (1000 + i))) for i in range(5)},
    )
    data = path.read_bytes()
    header = read_header(io.BytesIO(data), len(data), str(path))  # type: ignore[arg-type]
    offsets = {
        offset
        for _i, offset, _c in chunker.iter_chunks(io.BytesIO(data), header.regions(len(data)))
    }  # type: ignore[arg-type]
    assert {t.begin for t in header.tensors} <= offsets


@pytest.mark.parametrize("block", [chunker.MAXIMUM + 4099, chunker.BLOCK])
def test_chunks_cut_from_blocks_are_the_cuts_of_a_stream(monkeypatch, block, tmp_path):
    """Cutting block by block gives the chunks FastCDC's stream gives (the cuts every earlier
    version's chunks were made with, so they keep deduplicating): random bytes and runs of
    zeros (chunks of the maximum size), regions ending on and beside block boundaries."""
    import io

    monkeypatch.setattr(chunker, "BLOCK", block)
    rng = random.Random(5)
    data = rng.randbytes(5 * block) + bytes(3 * block) + rng.randbytes(2 * block)
    bounds = [0, 100, block, 2 * block + 1, 4 * block - 1, 4 * block + 20_000, 9 * block]
    regions = [*pairwise(bounds), (9 * block, len(data))]
    expected = [
        (index, begin + c.offset, bytes(c.data))
        for index, (begin, end) in enumerate(regions)
        for c in chunker.new_chunker().cut_stream(io.BytesIO(data[begin:end]))
    ]
    found = [(i, o, bytes(c)) for i, o, c in chunker.iter_chunks(io.BytesIO(data), regions)]
    assert found == expected and len(found) > 20
    blocks = list(chunker.iter_blocks(io.BytesIO(data), regions))
    assert all(bytes(b) == b"".join(c) == data[o : o + len(b)] for _i, o, b, c in blocks)
    assert len(blocks) < len(found)

    class ShortReads(io.BytesIO):  # a file system that answers reads in pieces
        def read(self, size=-1):
            return super().read(min(size, 70_001))

    found = [(i, o, bytes(c)) for i, o, c in chunker.iter_chunks(ShortReads(data), regions)]
    assert found == expected
    with pytest.raises(EOFError):  # the file shrank meanwhile
        list(chunker.iter_chunks(io.BytesIO(data[: 3 * block]), regions))

    # A file opened unbuffered, as backups open them, is read at offsets (pread): the same.
    (tmp_path / "f").write_bytes(data)
    with open(tmp_path / "f", "rb", buffering=0) as handle:
        found = [(i, o, bytes(c)) for i, o, c in chunker.iter_chunks(handle, regions)]
    assert found == expected
    (tmp_path / "f").write_bytes(data[: 3 * block])
    with open(tmp_path / "f", "rb", buffering=0) as handle, pytest.raises(EOFError):
        list(chunker.iter_chunks(handle, regions))


def test_the_runbook_restores_by_hand(tmp_path, age_key):
    """The runbook's by-hand block restores the newest version with age, zstd, jq alone."""

    model = make_model_dir(tmp_path / "adapter")
    service = BackupService.from_path(_plan(tmp_path, age_key[1], model))
    service.backup("adapter")
    (model / "sub").mkdir()
    (model / "sub" / "special_tokens_map.json").write_text("{}")
    [newest] = service.backup("adapter")
    staging = tmp_path / "staging"
    result = restore_by_hand(tmp_path / "store", "adapter", age_key[0], staging)
    assert result.returncode == 0, result.stdout + result.stderr
    assert newest.source_metadata["version_digest"] in result.stdout
    assert _tree_digests(staging) == _tree_digests(model)


def test_the_drill_runs_the_tensor_digest_check(tmp_path, age_key):
    model = make_model_dir(tmp_path / "adapter", tensors=5)
    plan = _plan(tmp_path, age_key[1], model)
    BackupService.from_path(plan).backup("adapter")
    result = run_cli(
        "--plan",
        str(plan),
        "drill",
        "adapter",
        "--json",
        env={"SPARK_BACKUP_IDENTITY_FILE": str(age_key[0])},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"], report
    assert "tensor_digests" in json.dumps(report) and "5 tensors" in json.dumps(report)


def test_the_backup_asset_records_the_version(tmp_path, age_key):
    """Dagster: a backup run materializes the version with its digest, label and added bytes,
    and its checksum check passes (it covers the chunks: every one present)."""
    from dagster import DagsterInstance

    from spark_backup.defs.build import build_definitions
    from spark_backup.defs.checks import CHECKSUM_CHECK
    from spark_backup.engine.cadence import partition_key_for
    from spark_backup.plan import load_plan

    model = make_model_dir(tmp_path / "adapter", tensors=4)
    loaded = load_plan(_plan(tmp_path, age_key[1], model, label="support-assistant v7"))
    defs = build_definitions(loaded)
    partition = partition_key_for("daily", dt.datetime.now(dt.UTC))
    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("daily_backups").execute_in_process(
            instance=instance, partition_key=partition, run_config=quiet
        )
        assert result.success
        (materialization,) = result.asset_materializations_for_node("backups__adapter")
        metadata = materialization.metadata
        assert metadata["label"].value == "support-assistant v7"
        assert metadata["tensors"].value == 4 and metadata["added_bytes"].value > 0
        [version] = BackupService(loaded).copies("adapter")
        assert (
            metadata["version_digest"].value == version.manifest.source_metadata["version_digest"]
        )
        evaluations = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
        assert evaluations[CHECKSUM_CHECK].passed


def test_on_a_worm_store_chunks_are_locked_and_never_swept(
    tmp_path, seaweedfs, s3_lock_bucket, age_key, monkeypatch, one_chunk_packs
):
    monkeypatch.setenv("SPARK_TEST_S3_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("SPARK_TEST_S3_SECRET", seaweedfs.secret_key)
    store = {
        "name": "worm",
        "kind": "s3",
        "endpoint_url": seaweedfs.endpoint_url,
        "bucket": s3_lock_bucket,
        "prefix": "models",
        "region_name": seaweedfs.region,
        "access_key_id_env": "SPARK_TEST_S3_KEY_ID",
        "secret_access_key_env": "SPARK_TEST_S3_SECRET",
        "object_lock": {"mode": "COMPLIANCE", "retain_days": 1},
    }
    model = make_model_dir(tmp_path / "adapter", tensors=4)
    source = llm_source("adapter", str(model), retention={"daily": 1, "weekly": 0, "monthly": 0})
    service = BackupService.from_path(
        write_plan(
            tmp_path,
            plan_dict([age_key[1]], [source], stores=[store], defaults={"orphan_grace": "1h"}),
        )
    )
    [first] = service.backup("adapter")
    s3 = service.store_for(service.source("adapter"))
    chunks = _packed(s3, "adapter")
    assert chunks
    now = dt.datetime.now(dt.UTC)
    assert all(s3.locked(key, now) for key in chunks)
    assert s3.locked(first.source_metadata["chunk_refs"], now)
    _redraw(model, ["base_model.layers.1.lora_B.weight"])
    service.backup("adapter")
    # The first version expires but stays under its lock (a day): prunes past the sweep's
    # grace (an hour) keep every chunk it needs.
    for hours in (2, 4):
        report = service.prune(dry_run=False, now=now + dt.timedelta(hours=hours))
        assert report.locked == [first.id] and report.shared_expired == []
    assert _packed(s3, "adapter") >= chunks
    assert service.verify(service.find(first.id), service.identities(age_key[0])).ok


def test_packs_read_through_a_one_slot_cache_give_every_chunk_back(tmp_path):
    """Engine level: pack buffers are reused from pack to pack, on writing and on reading;
    with one cache slot every pack is evicted and its buffers reused many times, and every
    chunk must still come back exactly, in order, forwards and backwards."""
    from dataclasses import replace

    from pyrage import x25519

    from spark_backup.engine.blobs.packs import PackCache, PackWriter, read_chunks
    from spark_backup.engine.crypto import Recipients
    from spark_backup.engine.stores.local import LocalStore
    from spark_backup_tests.helpers import make_key

    key_file, public = make_key(tmp_path / "keys")
    identity = next(
        x25519.Identity.from_str(line)
        for line in key_file.read_text().splitlines()
        if line.startswith("AGE-SECRET-KEY-")
    )
    store = LocalStore("local", tmp_path / "store")
    store.root.mkdir()
    key = derive_chunk_key(CHUNK_SECRET, "s")
    rng = random.Random(5)
    chunks = [rng.randbytes(rng.randrange(1000, 40000)) for _ in range(60)]
    chunks += chunks[:7]  # known chunks, referenced where they lie
    writer = PackWriter(store, "s", key, Recipients((public,)), pack_target=90_000)
    numbers = [writer.add(chunk) for chunk in chunks]
    writer.close()
    assert len(writer.new_packs) > 10
    refs = []
    for number in numbers:
        ref = writer.refs[number]
        pid, offset, length = writer.location(ref.id)
        refs.append(replace(ref, pack=pid, offset=offset, length=length))
    with PackCache(store, "s", [identity], slots=1) as cache:
        assert list(read_chunks(store, "s", refs, [identity], "t", cache)) == chunks
        assert list(read_chunks(store, "s", refs[::-1], [identity], "t", cache)) == chunks[::-1]


def test_the_sweep_announces_before_it_deletes_and_remembers_deletions(tmp_path):
    """Engine level, on a real local store: a chunk goes only after it was announced for the
    grace; deleted chunks stay 'doomed' for a grace more, so a backup that listed the chunk
    before it went cannot commit a version that needs it; a rerun after an interruption reads
    the plans it left."""
    from spark_backup.engine.blobs.packs import PackWriter
    from spark_backup.engine.blobs.sweep import doomed_objects, sweep
    from spark_backup.engine.crypto import Recipients
    from spark_backup.engine.stores.local import LocalStore
    from spark_backup_tests.helpers import make_key

    _key, public = make_key(tmp_path / "keys")
    store = LocalStore("local", tmp_path / "store")
    store.root.mkdir()
    key = derive_chunk_key(CHUNK_SECRET, "s")
    writer = PackWriter(store, "s", key, Recipients((public,)), pack_target=1)
    kept_n, gone_n = writer.add(b"k" * 20000), writer.add(b"g" * 20000)
    writer.close()
    kept_id, gone_id = writer.refs[kept_n].id, writer.refs[gone_n].id
    kept, gone = (pack_key("s", writer.location(c)[0]) for c in (kept_id, gone_id))
    grace = dt.timedelta(hours=1)
    start = dt.datetime.now(dt.UTC) + grace  # the objects are older than the grace from here

    first = sweep(store, "s", {kept}, start, grace, dry_run=False)
    assert first.deleted == [] and first.waiting == [gone] and first.plan
    assert doomed_objects(store, "s") == {gone}  # a backup reusing it now is refused

    assert sweep(store, "s", {kept}, start + grace / 2, grace, dry_run=True).deleted == []
    later = sweep(store, "s", {kept}, start + grace, grace, dry_run=False)
    assert later.deleted == [gone] and _packed(store, "s") == {kept}
    assert doomed_objects(store, "s") == {gone}  # still remembered for a grace

    # Several plans (an interrupted sweep left its older one) are read together.
    again = sweep(store, "s", {kept}, start + grace * 1.5, grace, dry_run=False)
    assert again.deleted == [] and doomed_objects(store, "s") == {gone}
    assert len(list(store.list("s/chunk-sweeps/"))) == 1
    sweep(store, "s", {kept}, start + grace * 3, grace, dry_run=False)
    assert doomed_objects(store, "s") == set() and _packed(store, "s") == {kept}


class _FirstReleaseWriter:
    """The first release's chunk writer, as it wrote: one ``age(zstd(chunk))`` object per chunk
    at ``<scope>/chunks/<id[:2]>/<id>.zst.age``, and a ``chunk-refs/v1`` list of ids."""

    def __init__(self, store, scope: str, mac_key: bytes, recipients):
        self.store, self.scope, self.key = store, scope, mac_key
        self.recipients = recipients.parsed()
        self.stored: dict[str, int] = {}
        self.refs: list = []

    def add(self, data: bytes) -> int:
        from spark_backup.engine.blobs.chunks import ChunkRef, chunk_key
        from spark_backup.engine.blobs.keys import chunk_id

        digest = hashlib.sha256(data).digest()
        cid = chunk_id(self.key, digest)
        if cid not in self.stored:
            compressed = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)
            sealed = pyrage.encrypt(compressed, self.recipients)
            self.store.put_bytes(chunk_key(self.scope, cid), sealed)
            self.stored[cid] = len(sealed)
        self.refs.append(ChunkRef(cid, digest.hex(), len(data)))
        return len(self.refs) - 1

    def refs_list(self, now) -> tuple[str, str]:
        body = json.dumps(
            {
                "format": "spark-backup.chunk-refs/v1",
                "scope": self.scope,
                "chunks": sorted([c, s] for c, s in self.stored.items()),
            }
        ).encode()
        data = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(body)
        key = f"{self.scope}/chunk-refs/first-release-{now:%Y%m%dT%H%M%S}.json.zst"
        self.store.put_bytes(key, data)
        return key, hashlib.sha256(data).hexdigest()


def _first_release_reader(kind_reader):
    """Wraps a ``ModelVersionReader`` so that it writes the version as the first release did."""
    import contextlib
    import io

    from spark_backup.engine.blobs.version import VersionBuilder
    from spark_backup.engine.pipeline import utcnow
    from spark_backup.sources.llm_artifacts.reader import walk_model

    class FirstReleaseReader:
        kind = kind_reader.kind
        layers = ("json",)

        @contextlib.contextmanager
        def open(self):
            store, scope = kind_reader.access.store, kind_reader.source.name
            writer = _FirstReleaseWriter(
                store, scope, kind_reader.mac_key, kind_reader.access.recipients
            )
            builder = VersionBuilder(writer)  # type: ignore[arg-type]
            for name in walk_model(kind_reader.root):
                builder.add_file(str(kind_reader.root / name), name)
            builder.resolve()
            refs_key, refs_sha = writer.refs_list(utcnow())
            document = builder.document(scope, "first release", {})
            del document["layout"]
            self._metadata = {
                "label": "first release",
                "version_digest": document["digest"],
                "chunk_refs": refs_key,
                "chunk_refs_sha256": refs_sha,
            }
            yield io.BytesIO(json.dumps(document).encode())

        def metadata(self):
            return self._metadata

        def tool_versions(self):
            return {}

    return FirstReleaseReader()


def test_a_first_release_version_lists_verifies_restores_and_prunes(tmp_path, age_key, monkeypatch):
    """A version written as one object per chunk (the first release) next to versions in packs:
    listed, verified plain and deep, restored by spark-backup and by the runbook's block,
    replicated objects named, kept by prune while listed and swept once it expired."""

    from spark_backup.engine.blobs.chunks import existing_chunks
    from spark_backup.engine.blobs.sweep import doomed_objects
    from spark_backup.sources.llm_artifacts.kind import LlmArtifactsKind

    model = make_model_dir(tmp_path / "adapter", tensors=6)
    plan = _plan(tmp_path, age_key[1], model)
    service = BackupService.from_path(plan)
    store = service.store_for(service.source("adapter"))
    real_readers = LlmArtifactsKind.readers
    monkeypatch.setattr(
        LlmArtifactsKind,
        "readers",
        lambda self, *a, **k: [_first_release_reader(r) for r in real_readers(self, *a, **k)],
    )
    [old] = service.backup("adapter")
    monkeypatch.setattr(LlmArtifactsKind, "readers", real_readers)
    old_chunks = existing_chunks(store, "adapter")
    assert old_chunks and not existing_packs(store, "adapter")
    original = _tree_digests(model)
    document = read_document(service.find(old.id), service.identities(age_key[0]))
    assert all(len(c) == 3 for f in document["files"] for c in f["chunks"])

    # The runbook's block restores it by hand.
    result = restore_by_hand(tmp_path / "store", "adapter", age_key[0], tmp_path / "by-hand")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _tree_digests(tmp_path / "by-hand") == original

    # A prune while it is the only version keeps every chunk object.
    service.prune(dry_run=False)
    assert existing_chunks(store, "adapter") == old_chunks
    _redraw(model, ["base_model.layers.1.lora_A.weight"])
    [new] = service.backup("adapter")
    assert existing_packs(store, "adapter")

    listed = json.loads(run_cli("--plan", str(plan), "versions", "adapter", "--json").stdout)
    assert [r["id"] for r in listed] == [old.id, new.id]
    for version in (old, new):
        plain = service.verify(service.find(version.id))
        deep = service.verify(service.find(version.id), service.identities(age_key[0]))
        assert plain.ok and deep.ok, (plain.error, deep.error)
    service.restore(old.id, tmp_path / "old", identity_file=age_key[0])
    assert _tree_digests(tmp_path / "old") == original
    kind = service.kind_of(service.source("adapter"))
    names = {f.name for f in kind.replica_version(service.find(old.id)).files}
    assert {f"chunks/{c[:2]}/{c}.zst.age" for c in old_chunks} <= names

    # A sweep plan the first release wrote (chunk ids) is read as those objects' keys.
    some = sorted(old_chunks)[0]
    store.put_bytes(
        "adapter/chunk-sweeps/20261101T000000.000Z-0000.json",
        json.dumps(
            {
                "format": "spark-backup.chunk-sweep/v1",
                "unreferenced": {some: "2026-11-01T00:00:00+00:00"},
                "deleted": {},
            }
        ).encode(),
    )
    assert f"adapter/chunks/{some[:2]}/{some}.zst.age" in doomed_objects(store, "adapter")

    # The old version expires (one daily version kept): its chunk objects are announced, then
    # swept after the grace; the new version loses nothing.
    now = dt.datetime.now(dt.UTC)
    report = service.prune(dry_run=False, now=now)
    assert report.expired == [old.id]
    service.prune(dry_run=False, now=now + 2 * DAY)
    assert existing_chunks(store, "adapter") == {}
    assert not list(store.list("adapter/chunk-refs/first-release"))
    deep = service.verify(service.find(new.id), service.identities(age_key[0]))
    assert deep.ok, deep.error


def test_a_pack_without_index_or_an_index_without_pack_is_never_reused_and_prune_cleans_up(
    tmp_path, age_key
):
    """The crash table's pack rows: a backup that died between a pack and its index left a pack
    no index names (no later backup reuses its chunks); a prune that died between an index and
    its pack cannot happen (index first), but a lost pack behind an index is ignored too. The
    next backups write those chunks anew and prune removes both leftovers after the grace."""
    model = make_model_dir(tmp_path / "adapter", tensors=4)
    service = BackupService.from_path(_plan(tmp_path, age_key[1], model))
    store = service.store_for(service.source("adapter"))
    [first] = service.backup("adapter")
    kind = service.kind_of(service.source("adapter"))
    (pack,) = kind._refs(service.find(first.id))
    pid = packs.id_of_pack_key(pack)
    index = packs.index_key("adapter", pid)
    # The first version is gone (say it expired); its pack lost its index.
    (tmp_path / "store" / index).unlink()
    key = derive_chunk_key(CHUNK_SECRET, "adapter")
    assert known_chunks(store, "adapter", key)[0] == {}
    (model / "notes.txt").write_text("v2")
    [second] = service.backup("adapter")
    assert pack not in kind._refs(service.find(second.id))  # written anew, not reused

    # An index whose pack is gone names chunks no backup may reuse.
    (other,) = kind._refs(service.find(second.id))
    other_pid = packs.id_of_pack_key(other)
    moved = tmp_path / "moved-pack"
    (tmp_path / "store" / other).rename(moved)
    assert known_chunks(store, "adapter", key)[0] == {}
    moved.rename(tmp_path / "store" / other)

    # Once both earlier versions are expired (one kept a day), the orphaned pack is announced,
    # then swept; the kept version loses nothing.
    now = dt.datetime.now(dt.UTC)
    service.prune(dry_run=False, now=now)
    service.prune(dry_run=False, now=now + 2 * DAY)
    assert pack not in _packed(store, "adapter") and other in _packed(store, "adapter")
    assert {i.key for i in store.list("adapter/pack-index/")} == {
        packs.index_key("adapter", other_pid)
    }
    assert service.verify(service.find(second.id), service.identities(age_key[0])).ok
