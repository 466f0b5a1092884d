"""A SIMULATED recovery drill for the RPO target: writes every second, oplog slices every
SLICE_SECONDS (the 15-minute interval compressed, so the drill takes seconds), a crash, then a
point-in-time restore to 'latest', and the loss measured in seconds. The oplog is served by
mockupdb (recorded entries appended as the writes happen), the restore goes into nx-27017; what
a real replica set must confirm is in docs/runbooks/mongodb.md."""

from __future__ import annotations

import threading
import time
import uuid

from bson.timestamp import Timestamp

from spark_backup.service import BackupService
from spark_backup.sources import registry
from spark_backup.sources.base import RecoveryTarget
from spark_backup.sources.mongodb import dump as mongo_dump
from spark_backup.sources.mongodb import oplog as mongo_oplog
from spark_backup_tests.helpers import mongodb_source, plan_dict, write_plan
from spark_backup_tests.mongo_server import mongo_server
from spark_backup_tests.test_mongodb_oplog import recorded  # noqa: F401 - the fixture

SLICE_SECONDS = 3
WRITE_SECONDS = 1.0
DRILL_SECONDS = 7


def test_rpo_drill_loses_at_most_one_slice_interval(recorded, tmp_path, age_key, monkeypatch):  # noqa: F811
    server, oplog = recorded
    database = f"sbdrill_{uuid.uuid4().hex[:8]}"
    store = {"name": "local", "kind": "local", "path": str(tmp_path / "store")}
    start = int(time.time()) - 1
    oplog.entries = [{"ts": Timestamp(start, 1), "op": "n", "ns": "", "o": {"msg": "start"}}]

    with mongo_server().client() as client:
        client[database].orders.insert_one({"_id": -1, "base": True})
        try:
            # The base dump from nx-27017, taken as on a replica set consistent at `start`.
            restore_plan = write_plan(
                tmp_path,
                plan_dict([age_key[1]], [mongodb_source(mongo_server().uri, [database])], [store]),
                "restore.yaml",
            )
            with monkeypatch.context() as patch:
                ends = iter([{"t": start, "i": 1}, {"t": start, "i": 1}])
                patch.setattr(mongo_dump, "is_replica_set", lambda client: True)
                patch.setattr(mongo_oplog, "newest_ts", lambda client: next(ends))
                patch.setattr(mongo_oplog, "oldest_ts", lambda client: {"t": start, "i": 1})
                patch.setattr(mongo_oplog, "entries_after", lambda client, a, u: iter(()))
                BackupService.from_path(restore_plan).backup("docs")

            # Writes every second into the (simulated) replica set's oplog.
            slicing_source = mongodb_source(
                f"{server.uri}/?directConnection=true", [database], oplog={"enabled": True}
            )
            slicer = BackupService.from_path(
                write_plan(tmp_path, plan_dict([age_key[1]], [slicing_source], [store]))
            )
            writes: list[float] = []
            crashed = threading.Event()

            def write() -> None:
                number = 0
                while not crashed.is_set():
                    now = time.time()
                    entry = {
                        "ts": Timestamp(int(now), number + 2),
                        "op": "i",
                        "ns": f"{database}.orders",
                        "o": {"_id": number, "written_at": now},
                    }
                    oplog.entries.append(entry)
                    writes.append(now)
                    number += 1
                    crashed.wait(WRITE_SECONDS)

            writer = threading.Thread(target=write, daemon=True)
            writer.start()
            deadline = time.time() + DRILL_SECONDS
            while time.time() < deadline:
                time.sleep(SLICE_SECONDS)
                slicer.backup("docs", artifact="oplog")
            # The crash comes most of an interval after the last slice: the writes since are lost.
            time.sleep(SLICE_SECONDS * 0.8)
            crashed.set()
            writer.join()

            report = registry.kind("mongodb").recover(
                BackupService.from_path(restore_plan),
                BackupService.from_path(restore_plan).source("docs"),
                RecoveryTarget(None, into=f"{database}_drill"),
                tmp_path / "report",
                identity_file=age_key[0],
            )
            restored = list(client[f"{database}_drill"].orders.find({"_id": {"$gte": 0}}))
            last_saved = max(d["written_at"] for d in restored)
            loss = writes[-1] - last_saved
            lost_writes = len(writes) - len(restored)
            print(
                f"SIMULATED drill: {len(writes)} writes, slices every {SLICE_SECONDS} s, "
                f"{lost_writes} writes lost, loss {loss:.1f} s, reached {report.reached_time}"
            )
            assert report.ok and len(report.slices) >= DRILL_SECONDS // SLICE_SECONDS - 1
            assert sorted(d["_id"] for d in restored) == list(range(len(restored)))  # no hole
            assert 0 < loss <= SLICE_SECONDS + WRITE_SECONDS + 1
        finally:
            client.drop_database(database)
            client.drop_database(f"{database}_drill")
