"""What copies exist: read from the manifests in a store, never from a separate index.

Because the manifest is written last, listing manifests lists exactly the committed copies. Data
objects that no manifest names are orphans of interrupted backups; ``find_orphans`` reports
those old enough that no running backup can still own them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field

from spark_backup.engine.manifest import (
    Manifest,
    copy_id_of_data_key,
    copy_id_of_manifest_key,
    is_manifest_key,
    manifest_key,
    manifest_prefix,
    source_of,
)
from spark_backup.engine.signing import Verifier
from spark_backup.engine.stores.base import ObjectInfo, ObjectStore
from spark_backup.errors import IntegrityError, NotFoundError


@dataclass(frozen=True)
class DamagedManifest:
    """A manifest that cannot be read: its copy fails, every other copy is unaffected."""

    key: str
    copy_id: str | None
    uri: str
    error: str
    # IntegrityError's (3), or SignatureError's (11) for a forged or untrusted copy.
    exit_code: int = IntegrityError.exit_code


@dataclass
class Listing:
    copies: list[Manifest] = field(default_factory=list)  # oldest first
    damaged: list[DamagedManifest] = field(default_factory=list)


class Catalog:
    """The copies in one store."""

    def __init__(self, store: ObjectStore, verifier: Verifier | None = None):
        self.store = store
        self.verifier = verifier or Verifier()
        # Copy id -> signature verdict of the copies listed so far.
        self.verdicts: dict[str, str] = {}

    def listing(self, source: str) -> Listing:
        found = Listing()
        for info in self.store.list(manifest_prefix(source)):
            if not is_manifest_key(info.key):
                continue
            uri = self.store.object_uri(info.key)
            try:
                manifest = Manifest.from_json(self.store.get_bytes(info.key), uri)
                if manifest_key(manifest.source, manifest.id) != info.key:
                    raise IntegrityError(
                        f"{uri}: holds the manifest of another copy ({manifest.id})"
                    )
                self.verdicts[manifest.id] = self.verifier.check_manifest(
                    manifest, info.modified, uri
                )
            except IntegrityError as exc:
                found.damaged.append(
                    DamagedManifest(
                        info.key, copy_id_of_manifest_key(info.key), uri, str(exc), exc.exit_code
                    )
                )
                continue
            found.copies.append(manifest)
        found.copies.sort(key=lambda m: (m.started_at, m.id))
        return found

    def sources(self) -> list[str]:
        return sorted(
            {key.split("/", 1)[0] for key in (i.key for i in self.store.list()) if "/" in key}
        )


def list_copies(store: ObjectStore, source: str | None = None) -> list[Manifest]:
    """Committed copies (of ``source``, else of every source) whose manifests read, oldest
    first."""
    catalog = Catalog(store)
    found = [
        m
        for name in ([source] if source else catalog.sources())
        for m in catalog.listing(name).copies
    ]
    return sorted(found, key=lambda m: (m.started_at, m.id))


def find_copy(
    stores: Iterable[ObjectStore], copy_id: str, verifier: Verifier | None = None
) -> tuple[ObjectStore, Manifest, str]:
    """The store, manifest and signature verdict of a copy id; the id names its source, so no
    listing is needed. ``SignatureError`` if ``verifier`` does not accept its signature."""
    key = manifest_key(source_of(copy_id), copy_id)
    searched = []
    for store in stores:
        searched.append(store.name)
        try:
            raw = store.get_bytes(key)
        except NotFoundError:
            continue
        manifest = Manifest.from_json(raw, store.object_uri(key))
        if manifest.id != copy_id:
            raise IntegrityError(
                f"{store.object_uri(key)}: holds the manifest of another copy ({manifest.id})"
            )
        verifier = verifier or Verifier()
        # The store's time of the manifest matters only for an unsigned one.
        stored_at = None
        if verifier.enabled and manifest.signature is None:
            stored_at = next((i.modified for i in store.list(key) if i.key == key), None)
        return store, manifest, verifier.check_manifest(manifest, stored_at, store.object_uri(key))
    raise NotFoundError(f"copy {copy_id} not found in store(s) {', '.join(searched)}")


def latest_copy(copies: Iterable[Manifest], partition: str | None = None) -> Manifest | None:
    """The newest copy, of one partition if given (re-runs make several copies per partition)."""
    candidates = [c for c in copies if partition is None or c.partition == partition]
    return max(candidates, key=lambda m: (m.finished_at, m.id), default=None)


def latest_per_part(copies: Iterable[Manifest], partition: str) -> list[Manifest]:
    """The newest copy of each part (database, globals, ...) made for the partition."""
    of_partition = [c for c in copies if c.partition == partition]
    parts = sorted({c.part for c in of_partition})
    newest = (latest_copy(c for c in of_partition if c.part == part) for part in parts)
    return [m for m in newest if m is not None]


def find_orphans(
    store: ObjectStore, older_than: dt.timedelta, now: dt.datetime | None = None
) -> list[ObjectInfo]:
    """Data objects of copies without a manifest, older than ``older_than`` (younger ones may
    belong to a backup still running). Objects spark-backup did not write are never orphans."""
    cutoff = (now or dt.datetime.now(dt.UTC)) - older_than
    objects = list(store.list())
    committed = {copy_id_of_manifest_key(info.key) for info in objects} - {None}
    return [
        info
        for info in objects
        if (copy_id := copy_id_of_data_key(info.key)) is not None
        and copy_id not in committed
        and info.modified < cutoff
    ]
