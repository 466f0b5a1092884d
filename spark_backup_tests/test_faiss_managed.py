"""Managed vector stores behind the adapter: the Pinecone-shaped backup API, tested with a fake
client that keeps its indexes and backups in memory (pure logic: no vector-store service runs
here)."""

from __future__ import annotations

import itertools

import pytest

from spark_backup.errors import SourceError
from spark_backup.sources.faiss.managed import (
    PineconeShapedAdapter,
    restore_managed,
    snapshot_managed,
)

MODEL = {"name": "bge-small-en", "version": "1.5"}


class FakePinecone:
    """The methods and answer shapes of Pinecone's backup API (keyword arguments only)."""

    def __init__(self, pending_polls: int = 2, final: str = "Ready"):
        self.indexes = {"docs": {"dimension": 384, "record_count": 1200, "metric": "cosine"}}
        self.backups: dict[str, dict] = {}
        self.polls: dict[str, int] = {}
        self.pending_polls = pending_polls
        self.final = final
        self._ids = itertools.count(1)

    def create_backup(self, *, index_name: str, backup_name: str, description: str = ""):
        index = self.indexes[index_name]
        backup_id = f"bk-{next(self._ids)}"
        self.backups[backup_id] = {"source_index_name": index_name, "name": backup_name, **index}
        self.polls[backup_id] = 0
        return {"backup_id": backup_id, "status": "Initializing"}

    def describe_backup(self, *, backup_id: str):
        backup = self.backups[backup_id]
        self.polls[backup_id] += 1
        status = self.final if self.polls[backup_id] > self.pending_polls else "Pending"
        return {"backup_id": backup_id, "status": status, **backup}

    def create_index_from_backup(self, *, backup_id: str, name: str):
        if name in self.indexes:
            raise RuntimeError(f"index {name} exists")
        backup = self.backups[backup_id]
        self.indexes[name] = {k: backup[k] for k in ("dimension", "record_count", "metric")}
        return {"restore_job_id": "rj-1", "index_id": name}


def test_a_managed_backup_is_waited_for_and_restored_into_a_new_index() -> None:
    client = FakePinecone(pending_polls=2)
    slept: list[float] = []
    adapter = PineconeShapedAdapter(client)
    entry = snapshot_managed(adapter, "docs", "nightly", MODEL, poll=3, sleep=slept.append)
    assert slept == [3, 3]  # two pending answers, then ready
    assert entry["backup_id"] == "bk-1" and entry["status"] == "Ready"
    assert (entry["dimension"], entry["ntotal"], entry["metric"]) == (384, 1200, "cosine")
    assert entry["embedding_model"] == MODEL

    made = restore_managed(adapter, entry, "docs-restored")
    assert made["index"] == "docs-restored"
    assert client.indexes["docs-restored"] == client.indexes["docs"]


def test_a_failed_or_overdue_backup_names_the_index_and_backup() -> None:
    adapter = PineconeShapedAdapter(FakePinecone(pending_polls=0, final="Failed"))
    with pytest.raises(SourceError, match=r"'docs': backup bk-1 ended Failed"):
        snapshot_managed(adapter, "docs", "nightly", MODEL, sleep=lambda _s: None)

    ticks = iter(range(0, 10_000, 100))
    adapter = PineconeShapedAdapter(FakePinecone(pending_polls=10**6))
    with pytest.raises(SourceError, match=r"bk-1 not ready after 300s"):
        snapshot_managed(
            adapter,
            "docs",
            "nightly",
            MODEL,
            timeout=300,
            sleep=lambda _s: None,
            clock=lambda: next(ticks),
        )


def test_restore_refuses_a_backup_that_differs_from_the_catalogue() -> None:
    client = FakePinecone(pending_polls=0)
    adapter = PineconeShapedAdapter(client)
    entry = snapshot_managed(adapter, "docs", "nightly", MODEL, sleep=lambda _s: None)
    client.backups[entry["backup_id"]]["record_count"] = 999
    with pytest.raises(SourceError, match="record_count 999 differs from the catalogue's 1200"):
        restore_managed(adapter, entry, "docs-restored")
    assert "docs-restored" not in client.indexes
