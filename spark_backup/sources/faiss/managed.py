"""Managed vector stores behind one adapter interface: a store that backs itself up on its
own side (Pinecone, ...) is asked to, waited for, and recorded in the same catalogue shape as a
FAISS snapshot; a restore makes a new index from a backup, never over an existing one.

``PineconeShapedAdapter`` speaks the shape of Pinecone's backup API (``create_backup`` ->
``backup_id``, ``describe_backup``, ``create_index_from_backup``) through any client object
that has those methods: the ``pinecone`` package's client, or a fake in the tests. spark-backup
itself depends on no vector-store SDK.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from spark_backup.errors import SourceError


@dataclass(frozen=True)
class ManagedBackup:
    """A backup the managed store holds, as it describes it."""

    backup_id: str
    index: str
    status: str  # "Ready", "Pending", "Failed", ... as the store says
    dimension: int | None = None
    record_count: int | None = None
    metric: str | None = None
    created_at: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.status.lower() == "ready"

    @property
    def failed(self) -> bool:
        return self.status.lower() in {"failed", "error"}


class ManagedVectorStore(ABC):
    """What spark-backup needs of a managed vector store."""

    @abstractmethod
    def create_backup(self, index: str, name: str, description: str = "") -> str:
        """Ask the store to back ``index`` up; return the backup's id."""

    @abstractmethod
    def describe_backup(self, backup_id: str) -> ManagedBackup: ...

    @abstractmethod
    def create_index_from_backup(self, backup_id: str, new_index: str) -> str:
        """Make a new index from a backup; return its name."""


def _get(item: Any, name: str) -> Any:
    """A field of a client's answer, whether an object or a dict."""
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)


class PineconeShapedAdapter(ManagedVectorStore):
    """Pinecone's backup API shape over ``client`` (``pinecone.Pinecone()`` or a fake)."""

    def __init__(self, client: Any):
        self.client = client

    def create_backup(self, index: str, name: str, description: str = "") -> str:
        answer = self.client.create_backup(
            index_name=index, backup_name=name, description=description
        )
        backup_id = _get(answer, "backup_id")
        if not backup_id:
            raise SourceError(f"managed index {index!r}: the store returned no backup_id")
        return str(backup_id)

    def describe_backup(self, backup_id: str) -> ManagedBackup:
        answer = self.client.describe_backup(backup_id=backup_id)
        return ManagedBackup(
            backup_id=str(_get(answer, "backup_id") or backup_id),
            index=str(_get(answer, "source_index_name") or ""),
            status=str(_get(answer, "status") or "unknown"),
            dimension=_get(answer, "dimension"),
            record_count=_get(answer, "record_count"),
            metric=_get(answer, "metric"),
            created_at=_get(answer, "created_at"),
        )

    def create_index_from_backup(self, backup_id: str, new_index: str) -> str:
        self.client.create_index_from_backup(backup_id=backup_id, name=new_index)
        return new_index


def snapshot_managed(
    store: ManagedVectorStore,
    index: str,
    name: str,
    embedding_model: dict[str, str],
    *,
    timeout: float = 3600.0,
    poll: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Back ``index`` up on the store's side and wait until the backup is ready; return its
    catalogue entry (the FAISS catalogue's fields where the store reports them). A failed or
    overdue backup is an error naming the index and the backup."""
    backup_id = store.create_backup(index, name, f"spark-backup {name}")
    deadline = clock() + timeout
    while True:
        found = store.describe_backup(backup_id)
        if found.ready:
            break
        if found.failed:
            raise SourceError(f"managed index {index!r}: backup {backup_id} ended {found.status}")
        if clock() >= deadline:
            raise SourceError(
                f"managed index {index!r}: backup {backup_id} not ready after {timeout:.0f}s "
                f"(status {found.status})"
            )
        sleep(poll)
    return {
        "managed": True,
        "backup_id": found.backup_id,
        "index": index,
        "dimension": found.dimension,
        "ntotal": found.record_count,
        "metric": found.metric,
        "embedding_model": dict(embedding_model),
        "created_at": found.created_at,
        "status": found.status,
    }


def restore_managed(
    store: ManagedVectorStore, entry: dict[str, Any], new_index: str
) -> dict[str, Any]:
    """A new index from the backup a catalogue entry names; refuses a backup that is not ready
    or whose facts differ from what was recorded."""
    found = store.describe_backup(entry["backup_id"])
    if not found.ready:
        raise SourceError(f"managed backup {found.backup_id} is {found.status}, not Ready")
    for name, recorded in (
        ("dimension", entry.get("dimension")),
        ("record_count", entry.get("ntotal")),
    ):
        if recorded is not None and getattr(found, name) != recorded:
            raise SourceError(
                f"managed backup {found.backup_id}: {name} {getattr(found, name)} differs from "
                f"the catalogue's {recorded}"
            )
    made = store.create_index_from_backup(found.backup_id, new_index)
    return {"index": made, "backup": asdict(found)}
