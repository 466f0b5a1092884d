"""Oplog slices: each run of the ``oplog`` artifact saves what the replica set wrote since the
last saved timestamp, one copy per sub-daily partition, as raw BSON oplog entries (the format of
``mongodump --oplog``'s ``oplog.bson``), with ``after_ts``, ``first_ts`` and ``last_ts`` in its
manifest.

The chain: a slice continues from the newest slice's ``last_ts`` (its resume point is in the
store, not on the server), or from the newest dump's ``consistent_at`` when there is no slice
yet, or when the oplog no longer holds the newest slice's end but a newer dump exists (the gap
this leaves is reported, never hidden). A slice covers ``(after_ts, last_ts]``, where
``last_ts`` is the oplog's newest entry when the slice started reading: everything the server
wrote before ``read_at`` is saved. An oplog that rolled over past the resume point fails the
run; a gap between consecutive slices fails the lag check.
"""

from __future__ import annotations

import datetime as dt
import itertools
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from spark_backup.engine.manifest import Manifest
from spark_backup.engine.secrets import SecretResolver
from spark_backup.engine.streams import Readable
from spark_backup.errors import SourceError, UsageError
from spark_backup.sources.mongodb import oplog
from spark_backup.sources.mongodb.bsonfile import CollectionDigest
from spark_backup.sources.mongodb.server import KIND_NAME, connected, is_replica_set
from spark_backup.sources.mongodb.settings import MongoSource

OPLOG_PART = "oplog"
SLICE_LAYERS = ["bson"]


def is_slice(manifest: Manifest) -> bool:
    return manifest.part == OPLOG_PART


def slice_order(manifest: Manifest) -> tuple[int, int]:
    return oplog.ts_key(manifest.source_metadata["last_ts"])


def newest_base_position(dumps: Sequence[Manifest]) -> tuple[Manifest, dict[str, int]] | None:
    """The newest dump with an oplog position (dumps of a standalone server have none)."""
    positioned = [m for m in dumps if m.source_metadata.get("consistent_at")]
    if not positioned:
        return None
    newest = max(positioned, key=lambda m: oplog.ts_key(m.source_metadata["consistent_at"]))
    return newest, newest.source_metadata["consistent_at"]


@dataclass(frozen=True)
class Gap:
    """Slices that do not continue one another: the oplog between them is not saved."""

    after: Manifest
    before: Manifest

    def describe(self) -> str:
        return (
            f"gap in the oplog slices: {self.before.id} continues from "
            f"{self.before.source_metadata['after_ts']}, but {self.after.id} ended at "
            f"{self.after.source_metadata['last_ts']}"
        )


def chain_gaps(slices: Sequence[Manifest]) -> list[Gap]:
    ordered = sorted(slices, key=slice_order)
    return [
        Gap(previous, current)
        for previous, current in itertools.pairwise(ordered)
        if oplog.ts_key(current.source_metadata["after_ts"])
        != oplog.ts_key(previous.source_metadata["last_ts"])
    ]


def resume_point(
    source: MongoSource, slices: Sequence[Manifest], dumps: Sequence[Manifest], client: Any
) -> tuple[dict[str, int], str]:
    """Where the next slice starts, and why (``slice ID`` or ``dump ID``)."""
    base = newest_base_position(dumps)
    newest = max(slices, key=slice_order, default=None)
    oldest = oplog.oldest_ts(client)
    if newest is not None:
        saved = newest.source_metadata["last_ts"]
        if oldest is None or oplog.ts_key(oldest) <= oplog.ts_key(saved):
            return saved, f"slice {newest.id}"
        if (
            base is not None
            and oplog.ts_key(saved) < oplog.ts_key(base[1])
            and oplog.ts_key(oldest) <= oplog.ts_key(base[1])
        ):
            return base[1], f"dump {base[0].id}"  # a new chain; the gap check reports the hole
        raise SourceError(
            f"source {source.name!r}: the oplog rolled over past the last saved point "
            f"{saved} (slice {newest.id}; its oldest entry is now {oldest}): what was written "
            "in between is lost to point-in-time restore; take a dump to start a new chain, "
            "and make the oplog larger"
        )
    if base is None:
        raise UsageError(
            f"source {source.name!r}: no dump with an oplog position yet; oplog slices replay "
            "only onto a dump of the replica set, so back up the dump first"
        )
    if oldest is None or oplog.ts_key(oldest) > oplog.ts_key(base[1]):
        raise SourceError(
            f"source {source.name!r}: the oplog rolled over past dump {base[0].id}'s "
            f"consistent point {base[1]}; take a new dump"
        )
    return base[1], f"dump {base[0].id}"


class OplogSliceReader:
    """A ``PlaintextSource``: the oplog entries since the resume point, as one BSON file."""

    kind = KIND_NAME
    layers = SLICE_LAYERS
    part = OPLOG_PART

    def __init__(
        self,
        source: MongoSource,
        slices: Sequence[Manifest],
        dumps: Sequence[Manifest],
        secrets: SecretResolver | None = None,
    ):
        self.source = source
        self.secrets = secrets
        self.slices = list(slices)
        self.dumps = list(dumps)
        self._metadata: dict[str, Any] = {}

    @contextmanager
    def open(self) -> Iterator[Readable]:
        self._metadata = {}
        with connected(self.source, self.secrets) as client, tempfile.TemporaryFile() as spool:
            if not is_replica_set(client):
                raise SourceError(
                    f"source {self.source.name!r}: the server is not a replica set member, so "
                    "it has no oplog to slice (set oplog.enabled: false)"
                )
            after, resumed_from = resume_point(self.source, self.slices, self.dumps, client)
            read_at = dt.datetime.now(dt.UTC)
            until = oplog.newest_ts(client) or after
            if oplog.ts_key(until) < oplog.ts_key(after):
                until = after
            digest = CollectionDigest()
            first = None
            for ts, entry in oplog.entries_after(client, after, until):
                if oplog.protects(self.source, entry):
                    first = first or ts
                    spool.write(entry.raw)
                    digest.add(entry.raw)
            oldest = oplog.oldest_ts(client)
            if oldest is not None and oplog.ts_key(oldest) > oplog.ts_key(after):
                raise SourceError(
                    f"source {self.source.name!r}: the oplog rolled over past {after} while the "
                    "slice was read; what was written in between is lost to point-in-time restore"
                )
            spool.seek(0)
            yield spool
        self._metadata = {
            "after_ts": after,
            "first_ts": first,
            "last_ts": until,
            "read_at": read_at.isoformat(),
            "entries": digest.documents,
            "digest": digest.digest,
            "resumed_from": resumed_from,
        }

    def metadata(self) -> dict[str, Any]:
        return self._metadata

    def tool_versions(self) -> dict[str, str]:
        from importlib import metadata

        return {"pymongo": metadata.version("pymongo")}


def saved_through(slices: Sequence[Manifest]) -> dt.datetime | None:
    """Everything the server wrote before this moment is in a slice."""
    newest = max(slices, key=slice_order, default=None)
    return dt.datetime.fromisoformat(newest.source_metadata["read_at"]) if newest else None


def expendable_slices(slices: Sequence[Manifest], kept_dumps: Sequence[Manifest]) -> list[Manifest]:
    """Slices that end at or before the consistent point of the oldest dump kept: no restore
    from a kept dump replays them. Without a positioned dump, every slice stays."""
    positioned = [m for m in kept_dumps if m.source_metadata.get("consistent_at")]
    if not positioned:
        return []
    oldest = min(oplog.ts_key(m.source_metadata["consistent_at"]) for m in positioned)
    return [m for m in slices if slice_order(m) <= oldest]
