"""What copies exist: the manifests say so; an index makes asking cheap.

The manifests are the truth. Because a manifest is written last, the keys under
``<source>/manifests/`` are exactly the committed copies. Reading every manifest to list them
costs one read per copy, so each source also has an index (as restic keeps one beside its
snapshots): segments ``<source>/index/<UTC time>-<8 hex>.jsonl.zst``, each a complete picture of
the source's copies when it was written, one JSON line per copy holding its manifest and the
manifest object's size and modification time.

A listing lists the manifest keys (no reads: one request per 1,000 copies on S3) and takes each
copy from the newest segment when the segment holds that key with the same size and time. A
manifest the segment does not hold, or holds with another size or time, is read itself; a copy
the segment holds whose manifest is gone (pruned) is left out. So the index can save reads, but
it can neither show a copy that does not exist nor hide one that does, and a damaged or missing
segment only costs the reads it would have saved. Restores never read it.

Segments are create-only like every object: a new one is written after a backup and a prune
(``update_index``), or by a listing that had to read many manifests itself; older segments are
then deleted. A crash between the two leaves an older segment beside the newest, which nobody
reads and the next update deletes.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import json
import logging
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import zstandard
from pydantic import TypeAdapter, ValidationError

from spark_backup.engine.gc_pause import without_cyclic_gc
from spark_backup.engine.manifest import (
    SOURCE_NAME,
    Manifest,
    copy_id_of_data_key,
    copy_id_of_manifest_key,
    data_prefix,
    is_manifest_key,
    manifest_key,
    manifest_prefix,
    source_of,
    utc_stamp,
)
from spark_backup.engine.signing import Verifier
from spark_backup.engine.stores.base import ObjectInfo, ObjectStore, original_version
from spark_backup.errors import IntegrityError, NotFoundError, ObjectLockedError, StoreError

log = logging.getLogger(__name__)

INDEX_FORMAT = "spark-backup.index/v1"
# A listing that read this many manifests itself writes a new segment, so the next one does
# not (a lost or damaged index heals on first use; a few new copies are not worth a write).
REWRITE_AFTER_READS = 16

_SOURCE_RE = re.compile(rf"^{SOURCE_NAME}$")
_INDEX_KEY_RE = re.compile(
    rf"^(?P<source>{SOURCE_NAME})/index/\d{{8}}T\d{{6}}\.\d{{3}}Z-[0-9a-f]{{8}}\.jsonl\.zst$"
)


def index_prefix(source: str) -> str:
    return f"{source}/index/"


def new_index_key(source: str, now: dt.datetime) -> str:
    return f"{index_prefix(source)}{utc_stamp(now)}-{secrets.token_hex(4)}.jsonl.zst"


def is_index_key(key: str) -> bool:
    """A key spark-backup writes index segments under."""
    return _INDEX_KEY_RE.match(key) is not None


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
    """The copies of one source in a store, oldest first, and its manifests that cannot be read."""

    copies: list[Manifest] = field(default_factory=list)  # oldest first
    damaged: list[DamagedManifest] = field(default_factory=list)
    # Manifests read one by one because the index did not hold them (or held another version).
    manifests_read: int = 0
    # The segment used, if any, and why none was (a damaged one: "<uri>: <reason>").
    index_key: str | None = None
    index_problem: str | None = None


@dataclass(frozen=True)
class IndexHeader:
    """The first line of a segment; ``copies`` lines follow, which shows a truncated one."""

    format: str
    source: str
    copies: int
    written_at: str


@dataclass(frozen=True)
class IndexEntry:
    """One copy in a segment: its manifest, and the size and modification time its manifest
    object had, which tell whether the manifest is still the one indexed."""

    size: int
    modified: str
    manifest: Manifest

    @property
    def modified_at(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.modified)


@functools.cache
def _adapters() -> tuple[TypeAdapter[IndexHeader], TypeAdapter[IndexEntry]]:
    """Built on first use, when an index segment is read."""
    return TypeAdapter(IndexHeader), TypeAdapter(IndexEntry)


# A copy as a segment holds it: its manifest object's size and modification time, and the
# manifest.
Indexed = tuple[int, dt.datetime, Manifest]


def _modified(info: ObjectInfo) -> str:
    return info.modified.astimezone(dt.UTC).isoformat()


class Catalog:
    """The copies in one store. One instance per store and run: segments are create-only, so a
    segment read once is kept (by key) for every later listing in the run."""

    def __init__(self, store: ObjectStore, verifier: Verifier | None = None):
        self.store = store
        self.verifier = verifier or Verifier()
        # Copy id -> signature verdict of the copies listed so far.
        self.verdicts: dict[str, str] = {}
        self._segments: dict[str, dict[str, Indexed]] = {}
        # Manifests read one by one, by key, size and time: unchanged objects are not re-read.
        self._read: dict[tuple[str, int, str], Manifest] = {}

    def sources(self) -> list[str]:
        """The sources the store holds objects of (a folder each, named as a source)."""
        return [name for name in self.store.list_folders() if _SOURCE_RE.match(name)]

    def listing(self, source: str) -> Listing:
        """The committed copies of ``source``, oldest first, and its unreadable manifests."""
        found, manifests, segments = self._list(source)
        if found.manifests_read >= REWRITE_AFTER_READS or found.index_problem:
            self._write_index(source, found, manifests, segments)
        return found

    def update_index(self, source: str) -> Listing:
        """List ``source`` and write a segment of what was found, deleting older segments; after
        a backup or a prune. A store that refuses the write keeps its older segment, which is
        still correct, only slower: that is logged, not raised."""
        found, manifests, segments = self._list(source)
        self._write_index(source, found, manifests, segments)
        return found

    # --- reading --------------------------------------------------------------------------------

    def _list(self, source: str) -> tuple[Listing, dict[str, ObjectInfo], list[str]]:
        with without_cyclic_gc():
            return self._list_copies(source)

    def _list_copies(self, source: str) -> tuple[Listing, dict[str, ObjectInfo], list[str]]:
        manifests = {
            info.key: info for info in self.manifest_objects(source) if is_manifest_key(info.key)
        }
        segments = [
            info.key for info in self.store.list(index_prefix(source)) if is_index_key(info.key)
        ]
        found = Listing()
        indexed: dict[str, Indexed] = {}
        if segments:
            found.index_key = segments[-1]  # keys sort by the time they were written
            try:
                indexed = self._segment(source, found.index_key)
            except (IntegrityError, NotFoundError) as exc:
                # Deleted by a concurrent update, or damaged: the manifests still say it all.
                found.index_key, found.index_problem = None, str(exc)
        for key, info in manifests.items():
            entry = indexed.get(key)
            uri = self.store.object_uri(key)
            try:
                if entry is not None and entry[0] == info.size and entry[1] == info.modified:
                    manifest = entry[2]
                else:
                    manifest = self._manifest(info, found)
                # Checked however the manifest was found: the index is no more trusted than the
                # store it lies in; the time is the manifest object's own.
                self.verdicts[manifest.id] = self.verifier.check_manifest(
                    manifest, info.modified, uri
                )
            except IntegrityError as exc:
                found.damaged.append(
                    DamagedManifest(key, copy_id_of_manifest_key(key), uri, str(exc), exc.exit_code)
                )
                continue
            found.copies.append(manifest)
        found.copies.sort(key=lambda m: (m.started_at, m.id))
        return found, manifests, segments

    def manifest_objects(self, source: str) -> Iterable[ObjectInfo]:
        """The source's manifest objects. On a versioned store, each key's first version, the
        one the backup wrote: a delete marker cannot hide a copy from a listing, nor a version
        stacked on it replace it (``verify`` reports both as tampering)."""
        if not self.store.versioned:
            return self.store.list(manifest_prefix(source))
        found = []
        for key, history in self.store.versions(manifest_prefix(source)).items():
            original = original_version(history)
            if original is not None:
                found.append(ObjectInfo(key, original.size, original.modified, original.version_id))
        return found

    def _manifest(self, info: ObjectInfo, found: Listing) -> Manifest:
        version = (info.key, info.size, _modified(info))
        if version not in self._read:
            uri = self.store.object_uri(info.key)
            found.manifests_read += 1
            manifest = Manifest.from_json(self.store.get_bytes(info.key, info.version_id), uri)
            if manifest_key(manifest.source, manifest.id) != info.key:
                raise IntegrityError(f"{uri}: holds the manifest of another copy ({manifest.id})")
            self._read[version] = manifest
        return self._read[version]

    def _segment(self, source: str, key: str) -> dict[str, Indexed]:
        if key not in self._segments:
            self._segments[key] = read_segment(self.store, source, key)
        return self._segments[key]

    # --- writing --------------------------------------------------------------------------------

    def _write_index(
        self,
        source: str,
        found: Listing,
        manifests: dict[str, ObjectInfo],
        segments: list[str],
    ) -> None:
        entries = [
            IndexEntry(info.size, _modified(info), m)
            for m in found.copies
            if (info := manifests.get(manifest_key(m.source, m.id))) is not None
        ]
        key = new_index_key(source, dt.datetime.now(dt.UTC))
        try:
            write_segment(self.store, source, key, entries)
        except StoreError as exc:
            log.warning(
                "index of %s not updated (listing reads manifests instead): %s", source, exc
            )
            return
        self._segments[key] = {
            manifest_key(e.manifest.source, e.manifest.id): (e.size, e.modified_at, e.manifest)
            for e in entries
        }
        for old in segments:
            try:
                self.store.delete(old)
            except ObjectLockedError:
                pass  # a WORM bucket's default retention; nobody reads an older segment
            except StoreError as exc:
                log.warning("older index segment %s not deleted: %s", old, exc)
            self._segments.pop(old, None)


def write_segment(store: ObjectStore, source: str, key: str, entries: list[IndexEntry]) -> None:
    """One segment: a header line, then one line per copy; zstd with its frame checksum."""
    header = IndexHeader(INDEX_FORMAT, source, len(entries), dt.datetime.now(dt.UTC).isoformat())
    compressor = zstandard.ZstdCompressor(level=3, write_checksum=True)
    with (
        store.open_write(key) as sink,
        compressor.stream_writer(sink, closefd=False) as compressed,
    ):
        for record in (header, *entries):
            compressed.write(json.dumps(asdict(record), separators=(",", ":")).encode() + b"\n")


def read_segment(store: ObjectStore, source: str, key: str) -> dict[str, Indexed]:
    """A segment's copies by manifest key; ``IntegrityError`` if any of it is damaged."""
    uri = store.object_uri(key)
    try:
        with store.open_read(key) as raw:
            lines = _lines(zstandard.ZstdDecompressor().stream_reader(raw, closefd=False))
            header_adapter, entry_adapter = _adapters()
            header = header_adapter.validate_json(next(lines, b"{}"), strict=True)
            if header.format != INDEX_FORMAT or header.source != source:
                raise IntegrityError(f"{uri}: not an index segment of {source} ({header.format})")
            entries: dict[str, Indexed] = {}
            for line in lines:
                # Lax, unlike a manifest's: this line was written from a checked manifest and
                # the frame checksum holds it; strict would double the cost of every listing.
                entry = entry_adapter.validate_json(line)
                manifest = entry.manifest
                _check_entry(manifest, source, uri)
                entries[manifest_key(source, manifest.id)] = (
                    entry.size,
                    entry.modified_at,
                    manifest,
                )
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{uri}: index segment is damaged: {exc}") from None
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in error["loc"])
        raise IntegrityError(f"{uri}: index segment line field {where}: {error['msg']}") from None
    except (
        ValueError
    ) as exc:  # a time that is not ISO 8601 (after ValidationError, a ValueError too)
        raise IntegrityError(f"{uri}: index segment is damaged: {exc}") from None
    if len(entries) != header.copies:
        raise IntegrityError(
            f"{uri}: index segment is incomplete ({len(entries)} of {header.copies} copies)"
        )
    return entries


def _check_entry(manifest: Manifest, source: str, uri: str) -> None:
    """What a line must satisfy to stand for a manifest of ``source``. Lighter than a stored
    manifest's checks (``Manifest.checked``): the line was written from a checked manifest
    and the frame checksum holds it, but its copy must be the one its data key names."""
    if (
        manifest.source != source
        or not manifest.data_key.startswith(data_prefix(source))
        or copy_id_of_data_key(manifest.data_key) != manifest.id
    ):
        raise IntegrityError(f"{uri}: index segment line of {manifest.id} is not of {source}")
    manifest.started, manifest.finished  # noqa: B018 - retention needs both times


def _lines(stream: io.RawIOBase) -> Iterator[bytes]:
    yield from io.BufferedReader(stream, buffer_size=1 << 16)  # type: ignore[arg-type]


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
    listing is needed (and no index: a restore reads the manifest itself). ``SignatureError``
    if ``verifier`` does not accept its signature."""
    key = manifest_key(source_of(copy_id), copy_id)
    searched = []
    for store in stores:
        searched.append(store.name)
        # On a versioned store, the version the backup wrote (see Catalog._manifest_objects).
        original = None
        if store.versioned:
            original = original_version(store.versions(key).get(key, []))
            if original is None:
                continue
        try:
            raw = store.get_bytes(key, original.version_id if original else None)
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
            stored_at = (
                original.modified
                if original
                else next((i.modified for i in store.list(key) if i.key == key), None)
            )
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
    belong to a backup still running). Objects spark-backup did not write are never orphans,
    and neither are index segments or log objects: only data keys are looked at."""
    cutoff = (now or dt.datetime.now(dt.UTC)) - older_than
    orphans = []
    catalog = Catalog(store)
    for source in catalog.sources():
        # A manifest a delete marker hides still commits its copy.
        committed = {copy_id_of_manifest_key(info.key) for info in catalog.manifest_objects(source)}
        orphans += [
            info
            for info in store.list(data_prefix(source))
            if (copy_id := copy_id_of_data_key(info.key)) is not None
            and copy_id not in committed
            and info.modified < cutoff
        ]
    return orphans
