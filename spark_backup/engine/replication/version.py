"""What a replica holds: a version as named files, each with its sha256 and size."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from spark_backup.engine.manifest import Manifest, manifest_key
from spark_backup.engine.stores.base import ObjectStore
from spark_backup.engine.streams import Readable

# Media types of the archive pipeline's objects in an OCI artifact (one layer per file).
COPY_MEDIA_TYPE = "application/vnd.spark-backup.copy.v1+age"
MANIFEST_MEDIA_TYPE = "application/vnd.spark-backup.manifest.v1+json"


@dataclass(frozen=True)
class ReplicaFile:
    name: str  # the file's name in the replica (an OCI layer's title)
    sha256: str
    size: int
    media_type: str
    # The key under which a store replica keeps it (the source store's own key).
    key: str
    open: Callable[[], AbstractContextManager[Readable]] = field(compare=False, repr=False)

    @property
    def digest(self) -> str:
        """As an OCI digest."""
        return f"sha256:{self.sha256}"


@dataclass(frozen=True)
class ReplicaVersion:
    """One version of a source, as files: what a target must hold, digest for digest."""

    source: str
    version: str  # the copy id (or a kind's version id)
    partition: str
    files: tuple[ReplicaFile, ...]
    annotations: dict[str, str] = field(default_factory=dict)

    def expected(self) -> dict[str, str]:
        """File name -> OCI digest."""
        return {f.name: f.digest for f in self.files}


def copy_version(store: ObjectStore, manifest: Manifest) -> ReplicaVersion:
    """A copy of the archive pipeline as a version: its data object (digest: the manifest's
    ``stored.sha256``), then its manifest (digest of the manifest object as stored). The
    manifest is last, as in the commit protocol: a store replica holding it holds the data."""
    key = manifest_key(manifest.source, manifest.id)
    raw = store.get_bytes(key)
    data_name = manifest.data_key.rsplit("/", 1)[-1]
    files = (
        ReplicaFile(
            data_name,
            manifest.stored.sha256,
            manifest.stored.bytes,
            COPY_MEDIA_TYPE,
            manifest.data_key,
            lambda: store.open_read(manifest.data_key),
        ),
        ReplicaFile(
            key.rsplit("/", 1)[-1],
            hashlib.sha256(raw).hexdigest(),
            len(raw),
            MANIFEST_MEDIA_TYPE,
            key,
            lambda: store.open_read(key),
        ),
    )
    return ReplicaVersion(
        manifest.source,
        manifest.id,
        manifest.partition,
        files,
        {
            "org.opencontainers.image.created": manifest.finished_at,
            "org.cncf.model.name": manifest.source,
            "org.cncf.model.version": manifest.id,
            "dev.spark-backup.kind": manifest.kind,
            "dev.spark-backup.partition": manifest.partition,
            "dev.spark-backup.part": manifest.part,
            "dev.spark-backup.layers": ",".join(manifest.layers),
        },
    )
