"""Oplog slices at the wire level, against ``mockupdb`` (SIMULATED: a scripted server that
replays recorded oplog entries to pymongo's real find/getMore/killCursors on
``local.oplog.rs`` and answers ``hello`` as a replica set primary; it does not write an oplog
of its own, so what a real replica set writes, and when, is not proven here: see
docs/runbooks/mongodb.md). The store, manifests, chain, gaps, lag and expiry are real."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bson
import mockupdb
import pytest
from bson.timestamp import Timestamp

from spark_backup.engine.drill_record import DrillRecord, drill_keys_of, write_drill_record
from spark_backup.engine.pipeline import CompressionSettings, write_copy
from spark_backup.errors import SourceError, UsageError
from spark_backup.service import BackupService
from spark_backup.sources import registry
from spark_backup.sources.mongodb.slices import OPLOG_PART, chain_gaps
from spark_backup_tests.helpers import BytesSource, mongodb_source, plan_dict, write_plan

HELLO = {
    "ismaster": True,
    "isWritablePrimary": True,
    "setName": "rs0",
    "hosts": [],
    "minWireVersion": 0,
    "maxWireVersion": 21,
    "helloOk": True,
}
BATCH = 2  # small batches, so a slice needs getMore on its tailable cursor


def insert(t: int, i: int, ns: str = "shop.orders", **document: Any) -> dict:
    return {"ts": Timestamp(t, i), "op": "i", "ns": ns, "o": {"_id": f"{t}.{i}", **document}}


class RecordedOplog:
    """Answers find, getMore and killCursors on local.oplog.rs from a list of entries."""

    def __init__(self) -> None:
        self.entries: list[dict] = []
        self.cursors: dict[int, list[dict]] = {}
        self.ids = itertools.count(1000)
        self.tailable_finds = 0
        self.get_mores = 0

    def _matching(self, spec: dict) -> list[dict]:
        bounds = spec.get("filter", {}).get("ts", {})
        found = [
            e
            for e in self.entries
            if ("$gt" not in bounds or e["ts"] > bounds["$gt"])
            and ("$lte" not in bounds or e["ts"] <= bounds["$lte"])
        ]
        if dict(spec.get("sort", {})).get("$natural") == -1:
            found.reverse()
        return found[: spec["limit"]] if spec.get("limit") else found

    def handle(self, request) -> bool:
        """One handler for the oplog's commands (mockupdb matches a command's value too, and a
        cursor id differs every time); False leaves other requests to other responders."""
        name = request.command_name if request.is_command else None
        if name == "find" and request.doc["find"] == "oplog.rs":
            return self.find(request)
        if name == "getMore":
            return self.get_more(request)
        if name == "killCursors":
            return self.kill(request)
        return False

    def find(self, request) -> bool:
        spec = request.doc
        found = self._matching(spec)
        if spec.get("tailable"):
            self.tailable_finds += 1
            cursor_id = next(self.ids)
            self.cursors[cursor_id] = found[BATCH:]
            return request.ok(
                cursor={"id": cursor_id, "ns": "local.oplog.rs", "firstBatch": found[:BATCH]}
            )
        return request.ok(cursor={"id": 0, "ns": "local.oplog.rs", "firstBatch": found})

    def get_more(self, request) -> bool:
        self.get_mores += 1
        cursor_id = request.doc["getMore"]
        rest = self.cursors.get(cursor_id, [])
        batch, self.cursors[cursor_id] = rest[:BATCH], rest[BATCH:]
        # A tailable cursor stays open at the end of the oplog: an empty batch, not id 0.
        return request.ok(cursor={"id": cursor_id, "ns": "local.oplog.rs", "nextBatch": batch})

    def kill(self, request) -> bool:
        killed = list(request.doc["cursors"])
        for cursor_id in killed:
            self.cursors.pop(cursor_id, None)
        return request.ok(cursorsKilled=killed)


@pytest.fixture
def recorded() -> Iterator[tuple[mockupdb.MockupDB, RecordedOplog]]:
    server = mockupdb.MockupDB(auto_ismaster=False, max_wire_version=21)
    oplog = RecordedOplog()
    server.autoresponds("ismaster", **HELLO)
    server.autoresponds("hello", **HELLO)
    server.autoresponds("endSessions")
    server.autoresponds(oplog.handle)
    server.run()
    yield server, oplog
    server.stop()


@pytest.fixture
def service(tmp_path: Path, age_key, recorded) -> BackupService:
    server, _oplog = recorded
    uri = f"{server.uri}/?directConnection=true"
    source = mongodb_source(uri, ["shop"], oplog={"enabled": True}, connect_timeout="3s")
    return BackupService.from_path(write_plan(tmp_path, plan_dict([age_key[1]], [source])))


def seed_dump(service: BackupService, consistent_at: dict[str, int] | None) -> None:
    """A committed dump copy with the oplog position a replica-set dump records (the dump
    itself is tested against nx-27017, which has no oplog)."""

    class Dump(BytesSource):
        part = ""

        def metadata(self):
            return {"consistent_at": consistent_at, "databases": ["shop"], "collections": {}}

    store = service.store("local")
    store.check()  # creates a local store's folder on first use, as a backup run does
    write_copy(
        store,
        Dump(b"", kind="mongodb", layers=["tar"]),
        source_name="docs",
        partition=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        recipients=service.recipients(),
        compression=CompressionSettings(),
    )


def slices_of(service: BackupService):
    return [r.manifest for r in service.copies("docs", "oplog")]


def test_slices_resume_from_the_dump_then_from_each_other(
    service, recorded, age_key, tmp_path
) -> None:
    _server, oplog = recorded
    noop = {"ts": Timestamp(100, 4), "op": "n", "ns": "", "o": {"msg": "periodic noop"}}
    oplog.entries = [insert(100, 1), insert(100, 2), insert(100, 3), noop]
    oplog.entries += [insert(100, 5), insert(100, 6), insert(100, 7, ns="crm.contacts")]
    with pytest.raises(UsageError, match="no dump with an oplog position yet"):
        service.backup("docs", artifact="oplog")
    seed_dump(service, {"t": 100, "i": 2})

    (first,) = service.backup("docs", artifact="oplog")
    meta = first.source_metadata
    assert first.part == OPLOG_PART and first.layers == ["age", "zstd", "bson"]
    assert meta["after_ts"] == {"t": 100, "i": 2} and meta["last_ts"] == {"t": 100, "i": 7}
    assert meta["first_ts"] == {"t": 100, "i": 3}
    assert meta["entries"] == 3  # 3, 5 and 6: not the no-op, not crm (not in the plan)
    assert oplog.get_mores >= 1  # read through the tailable cursor's getMore

    oplog.entries += [insert(100, 8), insert(101, 1, total=5)]
    (second,) = service.backup("docs", artifact="oplog")
    assert second.source_metadata["after_ts"] == {"t": 100, "i": 7}
    assert second.source_metadata["last_ts"] == {"t": 101, "i": 1}
    assert second.source_metadata["entries"] == 2
    assert chain_gaps(slices_of(service)) == []

    # The slice holds the raw entries; the deep verify counts and digests them.
    identities = service.identities(age_key[0])
    for ref in service.copies("docs", "oplog"):
        outcome = service.verify(ref, identities)
        assert outcome.ok, outcome.error
        checked = registry.kind("mongodb").semantic_check(service, ref, identities, tmp_path)
        assert (
            checked.passed and checked.metrics["entries"] == ref.manifest.source_metadata["entries"]
        )
    target = service.restore(
        second.id, Path(service.plan_path.parent / "slice"), identity_file=age_key[0]
    )
    entries = bson.decode_all((Path(target["target"]) / "oplog.bson").read_bytes())
    assert [e["o"]["_id"] for e in entries] == ["100.8", "101.1"]


def test_lag_is_zero_when_idle_and_grows_with_unsaved_writes(service, recorded) -> None:
    _server, oplog = recorded
    kind = registry.kind("mongodb")
    source = service.source("docs")
    oplog.entries = [insert(100, 1), insert(100, 2)]
    seed_dump(service, {"t": 100, "i": 1})
    status = kind.lag(service, source, dt.datetime.now(dt.UTC))
    assert status.lag is None and not status.ok  # nothing saved yet
    service.backup("docs", artifact="oplog")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    idle = kind.lag(service, source, later)
    assert idle.lag == dt.timedelta(0) and idle.ok, idle  # the server wrote nothing since
    oplog.entries.append(insert(100, 3))
    behind = kind.lag(service, source, later)
    assert behind.lag > source.rpo and not behind.ok


def test_an_oplog_that_rolled_over_fails_the_slice_and_the_check(service, recorded) -> None:
    _server, oplog = recorded
    kind = registry.kind("mongodb")
    oplog.entries = [insert(100, 1), insert(100, 2)]
    seed_dump(service, {"t": 100, "i": 1})
    service.backup("docs", artifact="oplog")
    # The oplog moved on past the saved point (100, 2) before the next slice.
    oplog.entries = [insert(105, 1), insert(105, 2)]
    with pytest.raises(SourceError, match=r"rolled over past the last saved point"):
        service.backup("docs", artifact="oplog")
    assert len(slices_of(service)) == 1  # no copy that looks valid
    status = kind.lag(service, service.source("docs"), dt.datetime.now(dt.UTC))
    assert not status.ok and "rolled over" in status.problems[0]

    # A new dump restarts the chain; the hole before it stays reported as a gap.
    seed_dump(service, {"t": 105, "i": 1})
    (restarted,) = service.backup("docs", artifact="oplog")
    assert restarted.source_metadata["resumed_from"].startswith("dump ")
    (gap,) = chain_gaps(slices_of(service))
    status = kind.lag(service, service.source("docs"), dt.datetime.now(dt.UTC))
    assert not status.ok and status.problems == [gap.describe()]


def test_slices_expire_with_the_dumps_they_follow(service, recorded) -> None:
    _server, oplog = recorded
    kind = registry.kind("mongodb")
    oplog.entries = [insert(100, 1), insert(100, 2)]
    seed_dump(service, {"t": 100, "i": 1})
    service.backup("docs", artifact="oplog")
    oplog.entries.append(insert(100, 3))
    service.backup("docs", artifact="oplog")
    # Only a dump consistent at (100, 2) is kept: the first slice, ending there, is not needed.
    newer = {"consistent_at": {"t": 100, "i": 2}}
    kept = [type("M", (), {"source_metadata": newer})()]
    first, second = sorted(slices_of(service), key=lambda m: m.source_metadata["last_ts"]["i"])
    expired = kind.expire(service, service.source("docs"), kept, dt.datetime.now(dt.UTC), True)
    assert expired == [f"docs/manifests/{first.id}.json"]
    # Retention's daily/weekly/monthly rule never expires a slice on its own.
    report = service.prune(dry_run=True)
    assert first.id not in report.expired and second.id not in report.expired


def test_prune_removes_an_expired_slices_drill_records_and_lists_it_no_more(
    service, recorded
) -> None:
    """A slice is a copy: when the log's expire deletes it, its drill records go too and the
    listing index follows."""
    _server, oplog = recorded
    oplog.entries = [insert(100, 1), insert(100, 2)]
    seed_dump(service, {"t": 100, "i": 1})
    (first,) = service.backup("docs", artifact="oplog")
    seed_dump(service, {"t": 100, "i": 2})  # a newer dump: the slice is needed by none kept
    store = service.store_for(service.source("docs"))
    write_drill_record(
        store,
        DrillRecord(
            copy_id=first.id,
            source="docs",
            partition=first.partition or "",
            part=OPLOG_PART,
            drilled_at=dt.datetime.now(dt.UTC).isoformat(),
            passed=True,
            restore_seconds=0.1,
            drill_seconds=0.1,
            rto_seconds=3600,
            within_rto=True,
            check="semantic",
            description="1 oplog entries, digest equal",
        ),
    )
    assert drill_keys_of(store, "docs", first.id)
    report = service.prune(dry_run=False)
    assert f"docs/manifests/{first.id}.json" in report.log_expired
    assert drill_keys_of(store, "docs", first.id) == []
    assert first.id not in [m.id for m in slices_of(service)]
