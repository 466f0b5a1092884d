"""The catalog index (engine/catalog.py): written by backup and prune, read by every listing,
rebuilt from the manifests when lost or damaged, and never read by a restore."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import zstandard

from spark_backup.console import print_columns
from spark_backup.engine.catalog import REWRITE_AFTER_READS, Catalog, index_prefix
from spark_backup.engine.crypto import Recipients
from spark_backup.engine.manifest import Manifest, manifest_key
from spark_backup.engine.pipeline import CompressionSettings, write_copy
from spark_backup.engine.stores import LocalStore
from spark_backup.engine.stores.s3 import MIB, S3Store
from spark_backup.service import BackupService
from spark_backup_tests.helpers import (
    BytesSource,
    clone_copies,
    config_source,
    flip_last_byte,
    plan_dict,
    run_cli,
    write_plan,
)

SOURCE = "dgx_config"
START = dt.datetime(2026, 1, 5, 1, 0, tzinfo=dt.UTC)


class Spy:
    """Which keys a store was asked to read and which prefixes to list."""

    def __init__(self, store: LocalStore, monkeypatch: pytest.MonkeyPatch):
        self.reads: list[str] = []
        self.lists: list[str] = []
        open_read, list_ = store.open_read, store.list

        def spy_read(key: str, version_id: str | None = None):
            self.reads.append(key)
            return open_read(key, version_id)

        def spy_list(prefix: str = ""):
            self.lists.append(prefix)
            return list_(prefix)

        monkeypatch.setattr(store, "open_read", spy_read)
        monkeypatch.setattr(store, "list", spy_list)

    def manifest_reads(self) -> list[str]:
        return [key for key in self.reads if "/manifests/" in key]

    def index_reads(self) -> list[str]:
        return [key for key in self.reads if "/index/" in key]


def fresh(service: BackupService) -> BackupService:
    """The same plan opened again: a new run, with no catalog cached."""
    return BackupService.from_path(service.plan_path)


def store_of(service: BackupService) -> LocalStore:
    store = service.store("local")
    assert isinstance(store, LocalStore)
    return store


def segments(service: BackupService, source: str = SOURCE) -> list[Path]:
    folder = store_of(service).root / index_prefix(source)
    return sorted(folder.glob("*.jsonl.zst")) if folder.is_dir() else []


def segment_lines(segment: Path) -> list[dict]:
    text = zstandard.ZstdDecompressor().stream_reader(segment.read_bytes()).read()
    return [json.loads(line) for line in text.splitlines()]


def truth(service: BackupService, source: str = SOURCE) -> list[str]:
    """The ids of the copies whose manifests read, from the manifests alone."""
    store = store_of(service)
    ids = []
    for path in sorted((store.root / source / "manifests").glob("*.json")):
        try:
            ids.append(Manifest.from_json(path.read_bytes(), str(path)).id)
        except Exception:
            continue
    return sorted(ids)


def listed_ids(service: BackupService, source: str = SOURCE) -> list[str]:
    return sorted(ref.manifest.id for ref in service.copies(source))


@pytest.fixture
def many(service: BackupService) -> BackupService:
    """One real backup and enough clones of it that a listing without index rewrites one."""
    [made] = service.backup(SOURCE)
    clone_copies(
        store_of(service),
        made,
        REWRITE_AFTER_READS + 4,
        start=START,
        step=dt.timedelta(hours=6),
    )
    service.update_index(store_of(service), SOURCE)
    return service


def test_backup_writes_one_segment_of_every_copy_readable_with_zstd(
    service: BackupService,
) -> None:
    first = service.backup(SOURCE)[0]
    second = service.backup(SOURCE)[0]

    [segment] = segments(service)  # the first backup's segment was replaced
    text = subprocess.run(
        ["zstd", "-dc", str(segment)], capture_output=True, check=True, text=True
    ).stdout
    header, *lines = (json.loads(line) for line in text.splitlines())
    assert header["format"] == "spark-backup.index/v1"
    assert header["source"] == SOURCE and header["copies"] == 2
    assert [line["manifest"]["id"] for line in lines] == [first.id, second.id]
    on_disk = store_of(service).root / manifest_key(SOURCE, second.id)
    assert lines[1]["size"] == on_disk.stat().st_size
    assert lines[1]["manifest"] == json.loads(on_disk.read_bytes())


def test_listing_reads_the_index_not_the_manifests(
    many: BackupService, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = fresh(many)
    spy = Spy(store_of(service), monkeypatch)

    refs, damaged = service.listing(SOURCE)

    assert sorted(r.manifest.id for r in refs) == truth(service) and not damaged
    assert len(refs) == REWRITE_AFTER_READS + 5
    assert spy.manifest_reads() == []
    assert len(spy.index_reads()) == 1
    # One source is listed without walking the others or the whole store.
    assert spy.lists == [f"{SOURCE}/manifests/", f"{SOURCE}/index/"]
    # Later listings in the same run keep the segment they read.
    service.freshness(SOURCE)
    service.listing(SOURCE)
    assert len(spy.index_reads()) == 1 and spy.manifest_reads() == []


def test_list_of_every_source_lists_folders_not_the_store(
    many: BackupService, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = fresh(many)
    spy = Spy(store_of(service), monkeypatch)
    refs, damaged = service.all_listings()
    assert sorted(r.manifest.id for r in refs) == truth(service) and not damaged
    assert "" not in spy.lists and spy.manifest_reads() == []


def test_copies_newer_than_the_index_are_read_and_deleted_ones_left_out(
    many: BackupService, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_of(many)
    template = many.copies(SOURCE)[-1].manifest
    newer = clone_copies(
        store, template, 2, start=START + dt.timedelta(days=30), step=dt.timedelta(hours=1)
    )
    gone = many.copies(SOURCE)[0].manifest
    store.delete(manifest_key(SOURCE, gone.id))  # by hand: the index still holds it
    store.delete(gone.data_key)

    service = fresh(many)
    spy = Spy(store_of(service), monkeypatch)
    listing = service.catalog(store_of(service)).listing(SOURCE)

    ids = [m.id for m in listing.copies]
    assert sorted(ids) == truth(service)
    assert gone.id not in ids and {m.id for m in newer} <= set(ids)
    assert listing.manifests_read == 2
    assert sorted(spy.manifest_reads()) == sorted(manifest_key(SOURCE, m.id) for m in newer)
    # Two reads are not worth a write: the segment stays until the next backup or prune.
    assert len(segments(service)) == 1


def test_missing_index_is_rebuilt_from_the_manifests(many: BackupService) -> None:
    shutil.rmtree(store_of(many).root / index_prefix(SOURCE))

    service = fresh(many)
    listing = service.catalog(store_of(service)).listing(SOURCE)
    assert sorted(m.id for m in listing.copies) == truth(service)
    assert listing.manifests_read == REWRITE_AFTER_READS + 5 and listing.index_key is None
    assert len(segments(service)) == 1  # enough reads to write a new one

    again = fresh(many)
    listing = again.catalog(store_of(again)).listing(SOURCE)
    assert listing.manifests_read == 0 and sorted(m.id for m in listing.copies) == truth(again)


def test_a_few_copies_without_index_are_listed_without_writing(service: BackupService) -> None:
    service.backup(SOURCE)
    service.backup(SOURCE)
    shutil.rmtree(store_of(service).root / index_prefix(SOURCE))

    again = fresh(service)
    assert listed_ids(again) == truth(again)
    assert segments(again) == []  # a listing of a few copies leaves the store as it was
    again.backup(SOURCE)
    assert len(segments(again)) == 1  # the next backup writes it


def _drop_last_line(raw: bytes) -> bytes:
    lines = zstandard.ZstdDecompressor().stream_reader(raw).read().splitlines(keepends=True)
    return zstandard.ZstdCompressor(write_checksum=True).compress(b"".join(lines[:-1]))


def _other_source(raw: bytes) -> bytes:
    lines = zstandard.ZstdDecompressor().stream_reader(raw).read().splitlines(keepends=True)
    return zstandard.ZstdCompressor(write_checksum=True).compress(
        b"".join(lines).replace(b'"source":"dgx_config"', b'"source":"other"', 1)
    )


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda raw: raw[: len(raw) // 2], "damaged"),
        (flip_last_byte, "damaged"),
        (_drop_last_line, "incomplete"),
        (_other_source, "not an index segment of dgx_config"),
        (lambda raw: b"not zstd at all", "damaged"),
    ],
    ids=["truncated", "flipped-byte", "line-missing", "other-source", "garbage"],
)
def test_damaged_index_segment_is_ignored_and_replaced(many: BackupService, damage, reason) -> None:
    [segment] = segments(many)
    segment.write_bytes(damage(segment.read_bytes()))

    service = fresh(many)
    listing = service.catalog(store_of(service)).listing(SOURCE)

    assert sorted(m.id for m in listing.copies) == truth(service) and not listing.damaged
    assert listing.manifests_read == REWRITE_AFTER_READS + 5
    assert listing.index_problem is not None
    assert segment.name in listing.index_problem and reason in listing.index_problem
    [replacement] = segments(service)
    assert replacement != segment
    again = fresh(many)
    assert again.catalog(store_of(again)).listing(SOURCE).manifests_read == 0


def test_damaged_manifest_fails_its_own_copy_only(many: BackupService) -> None:
    victim = many.copies(SOURCE)[3].manifest
    path = store_of(many).root / manifest_key(SOURCE, victim.id)
    path.write_bytes(path.read_bytes()[:40])  # after it was indexed

    service = fresh(many)
    refs, damaged = service.listing(SOURCE)
    assert [d.copy_id for d in damaged] == [victim.id]
    assert "not valid JSON" in damaged[0].error and path.name in damaged[0].uri
    assert sorted(r.manifest.id for r in refs) == truth(service)
    assert victim.id not in {r.manifest.id for r in refs}

    listed = run_cli("--plan", str(service.plan_path), "list", SOURCE)
    assert listed.returncode == 3
    assert victim.id in listed.stderr and "damaged manifest" in listed.stderr
    assert all(copy_id in listed.stdout for copy_id in truth(service))
    verified = run_cli("--plan", str(service.plan_path), "verify", SOURCE, "--json")
    outcomes = {o["copy_id"]: o["ok"] for o in json.loads(verified.stdout)}
    assert verified.returncode == 3
    assert [copy_id for copy_id, ok in outcomes.items() if not ok] == [victim.id]


def test_prune_updates_the_index(tmp_path: Path, age_key, estate) -> None:
    retention = {"daily": 3, "weekly": 0, "monthly": 0}
    plan = plan_dict([age_key[1]], [config_source(SOURCE, [str(estate)], retention=retention)])
    service = BackupService.from_path(write_plan(tmp_path, plan))
    [made] = service.backup(SOURCE)
    clone_copies(store_of(service), made, 8, start=START, step=dt.timedelta(days=1))
    service.update_index(store_of(service), SOURCE)
    before = segments(service)

    dry = service.prune(dry_run=True)
    assert len(dry.expired) == 6 and segments(service) == before  # a dry run writes nothing

    report = service.prune(dry_run=False)
    assert sorted(report.expired) == sorted(dry.expired)
    [segment] = segments(service)
    assert segment not in before
    indexed = [line["manifest"]["id"] for line in segment_lines(segment)[1:]]
    assert sorted(indexed) == truth(service) == listed_ids(fresh(service))
    assert len(indexed) == 3
    again = fresh(service)
    assert again.catalog(store_of(again)).listing(SOURCE).manifests_read == 0


def test_index_segments_are_never_leftovers(service: BackupService) -> None:
    service.backup(SOURCE)
    [segment] = segments(service)
    old = (dt.datetime.now(dt.UTC) - dt.timedelta(days=30)).timestamp()
    os.utime(segment, (old, old))
    stalled = segment.with_name(f".{segment.name}.partial-0123abcd")
    stalled.write_bytes(b"half a segment")
    os.utime(stalled, (old, old))

    report = service.prune(dry_run=False)

    assert report.orphans == [] and report.damaged == [] and report.expired == []
    assert segment.exists()  # prune keeps its index
    assert not stalled.exists()  # and cleans up a write of it that never finished
    assert any(stalled.name in key for key in report.incomplete_uploads)


def test_restore_never_reads_the_index(
    many: BackupService, age_key, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [segment] = segments(many)
    segment.write_bytes(b"damaged")
    copy_id = many.copies(SOURCE)[-1].manifest.id

    service = fresh(many)
    spy = Spy(store_of(service), monkeypatch)
    summary = service.restore(copy_id, tmp_path / "restored", identity_file=age_key[0])

    assert summary["files"] > 0
    assert spy.index_reads() == [] and spy.lists == []
    assert spy.reads[0] == manifest_key(SOURCE, copy_id)


def test_list_prints_plain_columns_with_control_characters_escaped(
    service: BackupService,
) -> None:
    [made] = service.backup(SOURCE)
    [clone] = clone_copies(store_of(service), made, 1, start=START, step=dt.timedelta(hours=1))
    hostile = dataclasses.replace(clone, partition="2026-W02\x1b[2J\tx")
    path = store_of(service).root / manifest_key(SOURCE, clone.id)
    path.unlink()
    path.write_bytes(hostile.to_json())

    listed = run_cli("--plan", str(service.plan_path), "list", SOURCE, check=True)

    header, *rows = listed.stdout.splitlines()
    assert "\x1b" not in listed.stdout and "\t" not in listed.stdout
    assert "2026-W02\\x1b[2J\\x09x" in listed.stdout
    assert header.split() == [
        "id", "source", "part", "partition", "finished", "size", "stored", "store", "signature",
        "WORM", "drilled",
    ]  # fmt: skip
    assert len(rows) == 2
    # Columns line up: the store column starts at the same place on every line.
    assert len({line.rindex("local") for line in rows}) == 1
    assert header.rindex("store") == rows[0].rindex("local")


def test_catalog_of_a_store_without_sources(tmp_path: Path) -> None:
    store = LocalStore("local", tmp_path / "store")
    store.check()
    catalog = Catalog(store)
    assert catalog.sources() == []
    assert catalog.listing("absent").copies == []


def test_index_on_s3(seaweedfs, s3_bucket: str, age_key) -> None:
    store = S3Store("offsite", seaweedfs.client(), s3_bucket, "spark/prod", part_size=5 * MIB)
    template = write_copy(
        store,
        BytesSource(b"config = value\n" * 100),
        source_name=SOURCE,
        partition="2026-01-05",
        recipients=Recipients.from_keys([age_key[1]], "test"),
        compression=CompressionSettings(),
    )
    clone_copies(store, template, REWRITE_AFTER_READS + 4, start=START, step=dt.timedelta(hours=6))
    Catalog(store).update_index(SOURCE)
    [segment] = [info.key for info in store.list(index_prefix(SOURCE))]

    listing = Catalog(store).listing(SOURCE)
    assert listing.manifests_read == 0 and listing.index_key == segment
    assert len(listing.copies) == REWRITE_AFTER_READS + 5
    assert Catalog(store).sources() == [SOURCE]

    store.delete(segment)  # objects are create-only: damage is a new object under the same key
    store.put_bytes(segment, b"garbage")
    listing = Catalog(store).listing(SOURCE)
    assert listing.index_problem is not None and segment in listing.index_problem
    assert listing.manifests_read == REWRITE_AFTER_READS + 5
    assert len(listing.copies) == REWRITE_AFTER_READS + 5
    assert [info.key for info in store.list(index_prefix(SOURCE))] != [segment]
    assert Catalog(store).listing(SOURCE).manifests_read == 0


def test_columns_align_by_terminal_width(capsys: pytest.CaptureFixture[str]) -> None:
    print_columns(("name", "n"), [("日本", 1), ("ab\x1b[1m", 22), ("x\ty", 3)])
    assert capsys.readouterr().out.splitlines() == [
        "name       n",
        "日本       1",  # two wide characters take four columns
        "ab\\x1b[1m  22",
        "x\\x09y     3",
    ]
