"""Replication targets: the interface, and the store target."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod

from spark_backup.engine.replication.version import ReplicaFile, ReplicaVersion
from spark_backup.engine.stores.base import ObjectStore
from spark_backup.engine.streams import CHUNK_SIZE
from spark_backup.errors import IntegrityError, StoreError


class ReplicaUnavailable(StoreError):
    """The target cannot be reached or refused the request: the version stays unreplicated
    and is pushed again by the next run."""


class ReplicaTarget(ABC):
    name: str
    kind: str

    @abstractmethod
    def location(self, version: ReplicaVersion) -> str:
        """Where the version's replica is (for records and the UI)."""

    @abstractmethod
    def push(self, version: ReplicaVersion) -> dict[str, str]:
        """Put every file of ``version`` the target lacks; return what it holds afterwards
        (file name -> OCI digest). Never deletes or overwrites anything on the target."""

    @abstractmethod
    def held(self, version: ReplicaVersion) -> dict[str, str]:
        """File name -> OCI digest of what the target holds of ``version`` now (an empty
        mapping: nothing)."""


def _check_source(item: ReplicaFile, digest: str, size: int, version: ReplicaVersion) -> None:
    if (digest, size) != (item.sha256, item.size):
        raise IntegrityError(
            f"{version.version}: {item.name} read {size} bytes with sha256 {digest[:16]}..., "
            f"its version records {item.size} bytes {item.sha256[:16]}...: not replicated"
        )


class StoreReplica(ReplicaTarget):
    """Another store: each file under the key the source store uses, written create-only
    (data first, manifest last, so a replica store lists only whole copies)."""

    kind = "store"

    def __init__(self, name: str, store: ObjectStore):
        self.name = name
        self.store = store

    def location(self, version: ReplicaVersion) -> str:
        return self.store.object_uri(version.files[0].key)

    def push(self, version: ReplicaVersion) -> dict[str, str]:
        try:
            self.store.check()
        except StoreError as exc:
            raise ReplicaUnavailable(f"replica {self.name}: {exc}") from None
        for item in version.files:
            if self.store.exists(item.key):
                continue  # create-only: what is there is judged by held(), never replaced
            digest = hashlib.sha256()
            size = 0
            with item.open() as source, self.store.open_write(item.key) as target:
                while chunk := source.read(CHUNK_SIZE):
                    digest.update(chunk)
                    size += len(chunk)
                    target.write(chunk)
                # Raised inside the writer's block: a damaged source is never published.
                _check_source(item, digest.hexdigest(), size, version)
        return self.held(version)

    def held(self, version: ReplicaVersion) -> dict[str, str]:
        found = {}
        for item in version.files:
            if not self.store.exists(item.key):
                continue
            digest = hashlib.sha256()
            with self.store.open_read(item.key) as reader:
                while chunk := reader.read(CHUNK_SIZE):
                    digest.update(chunk)
            found[item.name] = f"sha256:{digest.hexdigest()}"
        return found
