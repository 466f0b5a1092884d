"""What copies exist: read from the manifests in a store, never from a separate index.

Because the manifest is written last, listing manifests lists exactly the committed copies. Data
objects that no manifest names are orphans of interrupted backups; ``find_orphans`` reports
those old enough that no running backup can still own them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from spark_backup.engine.manifest import (
    Manifest,
    is_data_key,
    is_manifest_key,
    manifest_key,
    manifest_prefix,
    source_of,
)
from spark_backup.engine.stores.base import ObjectInfo, ObjectStore
from spark_backup.errors import NotFoundError


def list_copies(store: ObjectStore, source: str | None = None) -> list[Manifest]:
    """Committed copies, oldest first (by start time, then id)."""
    manifests = [
        Manifest.from_json(store.get_bytes(info.key), store.object_uri(info.key))
        for info in store.list(manifest_prefix(source))
        if is_manifest_key(info.key)
    ]
    return sorted(manifests, key=lambda m: (m.started_at, m.id))


def find_copy(stores: Iterable[ObjectStore], copy_id: str) -> tuple[ObjectStore, Manifest]:
    """The store and manifest of a copy id; the id names its source, so no listing is needed."""
    key = manifest_key(source_of(copy_id), copy_id)
    searched = []
    for store in stores:
        searched.append(store.name)
        if store.exists(key):
            return store, Manifest.from_json(store.get_bytes(key), store.object_uri(key))
    raise NotFoundError(f"copy {copy_id} not found in store(s) {', '.join(searched)}")


def latest_copy(copies: Iterable[Manifest], partition: str | None = None) -> Manifest | None:
    """The newest copy, of one partition if given (re-runs make several copies per partition)."""
    candidates = [c for c in copies if partition is None or c.partition == partition]
    return max(candidates, key=lambda m: (m.finished_at, m.id), default=None)


def find_orphans(
    store: ObjectStore, older_than: dt.timedelta, now: dt.datetime | None = None
) -> list[ObjectInfo]:
    """Data objects no manifest names, older than ``older_than`` (younger ones may belong to a
    backup still running)."""
    cutoff = (now or dt.datetime.now(dt.UTC)) - older_than
    objects = list(store.list())
    named = {
        Manifest.from_json(store.get_bytes(info.key), store.object_uri(info.key)).data_key
        for info in objects
        if is_manifest_key(info.key)
    }
    return [
        info
        for info in objects
        if is_data_key(info.key) and info.key not in named and info.modified < cutoff
    ]
