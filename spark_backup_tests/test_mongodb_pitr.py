"""Oplog replay and point-in-time restore against nx-27017 (SIMULATED: it has no oplog, so the
replica-set side is replayed from recorded entries: the dump's own oplog window through
pymongo's oplog reads patched to return them, the slices as committed copies holding them).
What is real: the restore into databases, the replay of every operation through pymongo onto
the server, the chain of slices, the target time, and the clean-up of a failed restore."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import bson
import pytest
from bson.timestamp import Timestamp

from spark_backup.engine.pipeline import CompressionSettings, write_copy
from spark_backup.errors import IntegrityError, RestoreRefused
from spark_backup.service import BackupService
from spark_backup.sources import registry
from spark_backup.sources.base import RecoveryTarget
from spark_backup.sources.mongodb import dump as mongo_dump
from spark_backup.sources.mongodb import oplog as mongo_oplog
from spark_backup.sources.mongodb.apply import OplogApplier, apply_diff
from spark_backup.sources.mongodb.slices import OPLOG_PART
from spark_backup_tests.helpers import BytesSource, mongodb_source, plan_dict, run_cli, write_plan
from spark_backup_tests.mongo_server import mongo_server

T0 = int(dt.datetime.now(dt.UTC).timestamp()) - 3600  # the dump's consistent point


def ts(seconds: int, i: int = 1) -> Timestamp:
    return Timestamp(T0 + seconds, i)


@pytest.fixture
def databases() -> Iterator[str]:
    name = f"sbpitr_{uuid.uuid4().hex[:8]}"
    with mongo_server().client() as client:
        client[name].orders.insert_many({"_id": i, "qty": i, "tags": ["a"]} for i in range(5))
        yield name
        for existing in client.list_database_names():
            if existing.startswith(name):
                client.drop_database(existing)


def entries_for(db: str) -> list[dict]:
    """A day's oplog in miniature: every operation the replay must handle, with the state each
    leaves described in ``expected_state``."""
    ns = f"{db}.orders"
    return [
        {"ts": ts(100), "op": "i", "ns": ns, "o": {"_id": 10, "qty": 10, "tags": []}},
        {"ts": ts(200), "op": "u", "ns": ns, "o2": {"_id": 1}, "o": {"$set": {"qty": 100}}},
        {"ts": ts(250), "op": "n", "ns": "", "o": {"msg": "periodic noop"}},
        {
            "ts": ts(300),
            "op": "u",
            "ns": ns,
            "o2": {"_id": 2},
            "o": {
                "$v": 2,
                "diff": {"u": {"qty": 20}, "i": {"note": "x"}, "stags": {"a": True, "u1": "b"}},
            },
        },
        {"ts": ts(400), "op": "d", "ns": ns, "o": {"_id": 3}},
        {"ts": ts(500), "op": "c", "ns": f"{db}.$cmd", "o": {"create": "audit"}},
        {
            "ts": ts(600),
            "op": "c",
            "ns": "admin.$cmd",
            "o": {
                "applyOps": [
                    {"op": "i", "ns": f"{db}.audit", "o": {"_id": "t1", "order": 10}},
                    {
                        "op": "u",
                        "ns": ns,
                        "o2": {"_id": 10},
                        "o": {"$v": 2, "diff": {"u": {"qty": 11}}},
                    },
                ]
            },
        },
        {"ts": ts(900), "op": "u", "ns": ns, "o2": {"_id": 4}, "o": {"_id": 4, "qty": 44}},
    ]


def expected_state(until: int) -> dict[str, list[dict]]:
    orders = {i: {"_id": i, "qty": i, "tags": ["a"]} for i in range(5)}
    audit: list[dict] = []
    if until >= 100:
        orders[10] = {"_id": 10, "qty": 10, "tags": []}
    if until >= 200:
        orders[1]["qty"] = 100
    if until >= 300:
        orders[2] = {"_id": 2, "qty": 20, "tags": ["a", "b"], "note": "x"}
    if until >= 400:
        del orders[3]
    if until >= 600:
        audit = [{"_id": "t1", "order": 10}]
        orders[10]["qty"] = 11
    if until >= 900:
        orders[4] = {"_id": 4, "qty": 44}
    state = {"orders": sorted(orders.values(), key=lambda d: str(d["_id"]))}
    if until >= 500:
        state["audit"] = audit
    return state


def state_of(client, database: str) -> dict[str, list[dict]]:
    db = client[database]
    return {
        name: sorted(db[name].find(), key=lambda d: str(d["_id"]))
        for name in sorted(db.list_collection_names())
    }


def test_apply_diff_handles_nested_objects_and_arrays() -> None:
    document = {"_id": 1, "a": {"b": 1, "c": 2}, "list": [1, {"x": 1}, 3], "gone": True}
    diff = {
        "d": {"gone": False},
        "sa": {"u": {"b": 5}, "d": {"c": False}},
        "slist": {"a": True, "l": 2, "s1": {"i": {"y": 2}}},
    }
    assert apply_diff(document, diff) == {"_id": 1, "a": {"b": 5}, "list": [1, {"x": 1, "y": 2}]}


def test_replay_is_in_order_idempotent_and_renamed(databases: str) -> None:
    target = f"{databases}_replayed"
    with mongo_server().client() as client:
        client[target].orders.insert_many({"_id": i, "qty": i, "tags": ["a"]} for i in range(5))
        applier = OplogApplier(client, {databases: target})
        for _ in range(2):  # twice: a replay that restarts must land in the same state
            for entry in entries_for(databases):
                applier.apply(entry)
        assert state_of(client, target) == expected_state(900)
        assert client[databases].orders.count_documents({}) == 5  # the source is untouched
        with pytest.raises(IntegrityError, match="cannot be replayed"):
            applier.apply(
                {"ts": ts(950), "op": "c", "ns": f"{databases}.$cmd", "o": {"collMod": "orders"}}
            )


@pytest.fixture
def service(tmp_path: Path, age_key, databases: str, monkeypatch) -> BackupService:
    """A dump of the database, taken as on a replica set whose oplog moved from T0-60 to T0
    while it ran, and slices after it."""
    source = mongodb_source(mongo_server().uri, [databases], oplog={"enabled": True})
    service = BackupService.from_path(write_plan(tmp_path, plan_dict([age_key[1]], [source])))
    ends = iter([{"t": T0 - 60, "i": 1}, {"t": T0, "i": 1}])
    monkeypatch.setattr(mongo_dump, "is_replica_set", lambda client: True)
    monkeypatch.setattr(mongo_oplog, "newest_ts", lambda client: next(ends))
    monkeypatch.setattr(mongo_oplog, "oldest_ts", lambda client: {"t": T0 - 3600, "i": 1})
    during = {
        "ts": Timestamp(T0, 1),
        "op": "u",
        "ns": f"{databases}.orders",
        "o2": {"_id": 0},
        "o": {"$set": {"qty": 0}},
    }
    monkeypatch.setattr(
        mongo_oplog,
        "entries_after",
        lambda client, after, until: iter(
            [
                (
                    mongo_oplog.ts_json(during["ts"]),
                    bson.raw_bson.RawBSONDocument(bson.encode(during)),
                )
            ]
        ),
    )
    (dumped,) = service.backup("docs")
    assert dumped.source_metadata["consistent_at"] == {"t": T0, "i": 1}
    assert dumped.source_metadata["oplog_entries"] == 1
    entries = entries_for(databases)
    seed_slice(service, entries[:5], after=(T0, 1), last=(T0 + 450, 1))
    seed_slice(service, entries[5:], after=(T0 + 450, 1), last=(T0 + 950, 1))
    return service


def seed_slice(service, entries, after: tuple[int, int], last: tuple[int, int]) -> None:
    class Slice(BytesSource):
        part = OPLOG_PART

        def metadata(self):
            return {
                "after_ts": {"t": after[0], "i": after[1]},
                "first_ts": mongo_oplog.ts_json(entries[0]["ts"]),
                "last_ts": {"t": last[0], "i": last[1]},
                "read_at": dt.datetime.fromtimestamp(last[0] + 1, dt.UTC).isoformat(),
                "entries": len(entries),
            }

    write_copy(
        service.store("local"),
        Slice(b"".join(bson.encode(e) for e in entries), kind="mongodb", layers=["bson"]),
        source_name="docs",
        partition=dt.datetime.fromtimestamp(last[0], dt.UTC).strftime("%Y-%m-%d-%H:%M"),
        recipients=service.recipients(),
        compression=CompressionSettings(),
    )


def test_restore_to_a_time_replays_the_slices_up_to_it(
    service, databases, age_key, tmp_path
) -> None:
    kind = registry.kind("mongodb")
    at = dt.datetime.fromtimestamp(T0 + 350, dt.UTC)
    target = f"{databases}_at"
    report = kind.recover(
        service,
        service.source("docs"),
        RecoveryTarget(at, into=target),
        tmp_path / "report",
        identity_file=age_key[0],
    )
    assert report.ok and report.reached_ts == {"t": T0 + 300, "i": 1}  # the last entry <= T
    assert len(report.slices) == 1 and report.entries_applied == 1 + 3  # dump's own + slice's
    with mongo_server().client() as client:
        expected = expected_state(300)
        expected["orders"][0]["qty"] = 0  # the write during the dump, from its oplog.bson
        assert state_of(client, target) == expected
    assert json.loads((tmp_path / "report" / "mongo-pitr.json").read_text())["ok"] is True

    window = kind.recovery_window(service, service.source("docs"))
    assert window.earliest == dt.datetime.fromtimestamp(T0, dt.UTC)
    assert window.latest == dt.datetime.fromtimestamp(T0 + 951, dt.UTC)


def test_latest_on_the_command_line_and_what_is_refused(service, databases, age_key) -> None:
    plan = str(service.plan_path)
    target = f"{databases}_latest"
    result = run_cli(
        "--plan",
        plan,
        "mongo-pitr",
        "docs",
        "--to-time",
        "latest",
        "--to-db",
        target,
        "--identity",
        str(age_key[0]),
        "--json",
        "--report-dir",
        str(service.plan_path.parent),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["reached_ts"] == {"t": T0 + 900, "i": 1}
    with mongo_server().client() as client:
        assert len(state_of(client, target)["orders"]) == 5
    kind = registry.kind("mongodb")
    # An existing target is refused, and left as it was.
    with pytest.raises(RestoreRefused, match="already exists"):
        kind.recover(
            service,
            service.source("docs"),
            RecoveryTarget(None, into=target),
            service.plan_path.parent,
            identity_file=age_key[0],
        )
    # A slice that does not continue the chain: 'latest' stops with the last reachable point,
    # and leaves no database behind.
    seed_slice(service, [entries_for(databases)[-1]], after=(T0 + 960, 1), last=(T0 + 990, 1))
    with pytest.raises(IntegrityError, match="gap after"):
        kind.recover(
            service,
            service.source("docs"),
            RecoveryTarget(None, into=f"{databases}_gap"),
            service.plan_path.parent,
            identity_file=age_key[0],
        )
    with mongo_server().client() as client:
        assert f"{databases}_gap" not in client.list_database_names()


def test_point_in_time_by_hand_builds_the_oplog_mongorestore_replays(
    service, databases, age_key, tmp_path
) -> None:
    """The runbook's by-hand block: the dump's oplog.bson, then every slice after the dump's
    consistent point in order, each checked; a slice that breaks the chain stops it."""
    from spark_backup_tests.test_runbook_mongodb import _block, _run

    env = {
        "STORE": str(service.store("local").root),
        "SOURCE": "docs",
        "KEY": str(age_key[0]),
        "DUMP": str(tmp_path / "dump"),
    }
    # One shell, as an operator pastes steps 1 to 3 and then the slices block.
    by_hand = _block("# What to restore") + _block("# Point in time by hand")
    result = _run(by_hand, env)
    assert result.returncode == 0, result.stderr
    assert f"oplog saved through {T0 + 950}:1" in result.stdout
    replayed = bson.decode_all((tmp_path / "dump" / "oplog.bson").read_bytes())
    expected = [Timestamp(T0, 1)] + [e["ts"] for e in entries_for(databases)]
    assert [e["ts"] for e in replayed] == expected

    seed_slice(service, [entries_for(databases)[-1]], after=(T0 + 960, 1), last=(T0 + 990, 1))
    env["DUMP"] = str(tmp_path / "dump2")
    broken = _run(by_hand, env)
    assert broken.returncode == 3 and f"gap after {T0 + 950}:1" in broken.stderr
