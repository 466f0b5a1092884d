"""Daily dumps in mongodump's directory layout, streamed as a tar archive:

    <db>/<collection>.metadata.json   indexes, options, uuid (canonical extended JSON)
    <db>/<collection>.bson            the documents, raw BSON back to back
    <db>/<view>.metadata.json         a view: its definition only
    oplog.bson                        replica sets: the oplog written while the dump ran

so that an extracted copy restores with ``mongorestore --dir DIR [--oplogReplay]`` and no
spark-backup. Each collection is read with pymongo as raw BSON (never decoded), spooled to an
unlinked temporary file (tar needs a member's size before its bytes; memory holds one batch),
counted and digested (``bsonfile.py``) on the way.

On a replica set the dump is made consistent as ``mongodump --oplog`` makes it: the oplog's
newest timestamp is taken before the first collection is read, and the oplog entries written
until the last collection was read go into ``oplog.bson``. Replaying them (idempotent) brings
every collection to ``consistent_at``, the timestamp the manifest records and oplog slices
continue from. A standalone server has no oplog: its dump is consistent only if nothing wrote
while it ran, and the manifest says so.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from spark_backup.engine.secrets import SecretResolver
from spark_backup.engine.streams import ChunkReader, Readable
from spark_backup.engine.tar_stream import TarWriter
from spark_backup.errors import SourceError
from spark_backup.sources.mongodb import oplog
from spark_backup.sources.mongodb.bsonfile import DIGEST_ALGORITHM, CollectionDigest
from spark_backup.sources.mongodb.server import (
    KIND_NAME,
    Namespace,
    collection_uuid,
    connected,
    is_replica_set,
    list_namespaces,
)
from spark_backup.sources.mongodb.settings import MongoSource

DUMP_LAYERS = ["tar"]
OPLOG_FILE = "oplog.bson"
BATCH_SIZE = 1000


def escape_name(name: str) -> str:
    """A collection name as a file name, escaped as mongodump escapes it."""
    return name.replace("%", "%25").replace("/", "%2F")


def unescape_name(name: str) -> str:
    return name.replace("%2F", "/").replace("%2f", "/").replace("%25", "%")


def bson_member(database: str, collection: str) -> str:
    return f"{database}/{escape_name(collection)}.bson"


def metadata_member(database: str, collection: str) -> str:
    return f"{database}/{escape_name(collection)}.metadata.json"


def canonical_json(document: Any) -> bytes:
    from bson import json_util

    return json_util.dumps(document, json_options=json_util.CANONICAL_JSON_OPTIONS).encode()


class MongoDumpReader:
    """A ``PlaintextSource``: the tar stream of one dump, with per-collection counts and
    digests and the consistent oplog timestamp for the manifest."""

    kind = KIND_NAME
    layers = DUMP_LAYERS
    part = ""

    def __init__(self, source: MongoSource, secrets: SecretResolver | None = None):
        self.source = source
        self.secrets = secrets
        self._metadata: dict[str, Any] = {}
        self._server_version = "unknown"

    @contextmanager
    def open(self) -> Iterator[Readable]:
        self._metadata = {}
        with connected(self.source, self.secrets) as client:
            yield ChunkReader(self._archive(client))

    def _archive(self, client: Any) -> Iterator[bytes]:
        source = self.source
        started = dt.datetime.now(dt.UTC)
        self._server_version = str(client.server_info().get("version") or "unknown")
        replica_set = is_replica_set(client)
        start_ts = oplog.newest_ts(client) if replica_set else None
        namespaces = list_namespaces(client, source)
        tar = TarWriter()
        collections: dict[str, Any] = {}
        databases: list[str] = []
        for namespace in namespaces:
            if namespace.database not in databases:
                databases.append(namespace.database)
                yield from tar.directory(namespace.database)
            metadata = canonical_json(_metadata_document(client, namespace))
            yield from tar.file(
                metadata_member(namespace.database, namespace.collection),
                len(metadata),
                _BytesReader(metadata),
            )
            if namespace.type == "view":
                collections[namespace.name] = {"type": "view"}
                continue
            with tempfile.TemporaryFile(prefix="spark-backup-mongodb-") as spool:
                digest = _spool_collection(client, namespace, spool)
                _check_still_there(client, namespace, source)
                spool.seek(0)
                yield from tar.file(
                    bson_member(namespace.database, namespace.collection), digest.bytes, spool
                )
            collections[namespace.name] = {"type": "collection", **digest.summary()}
        consistent_at = None
        oplog_entries = 0
        if replica_set and start_ts is not None:
            end_ts = oplog.newest_ts(client)
            oldest = oplog.oldest_ts(client)
            if end_ts is None or oldest is None or oplog.ts_key(oldest) > oplog.ts_key(start_ts):
                raise SourceError(
                    f"source {source.name!r}: the oplog rolled over while the dump ran (it now "
                    f"starts after {start_ts}); make the oplog larger or dump less at once"
                )
            with tempfile.TemporaryFile(prefix="spark-backup-oplog-") as spool:
                digest = CollectionDigest()
                for _ts, entry in oplog.entries_after(client, start_ts, end_ts):
                    if oplog.protects(source, entry):
                        spool.write(entry.raw)
                        digest.add(entry.raw)
                spool.seek(0)
                yield from tar.file(OPLOG_FILE, digest.bytes, spool)
            oplog_entries = digest.documents
            consistent_at = end_ts
        yield from tar.end()
        warnings = []
        if not replica_set:
            warnings.append(
                "standalone server: no oplog, so the dump is consistent only if nothing wrote "
                "while it ran, and no oplog slices can follow it"
            )
        self._metadata = {
            "databases": databases,
            "collections": collections,
            "documents": sum(c.get("documents", 0) for c in collections.values()),
            "digest_algorithm": DIGEST_ALGORITHM,
            "dump_tool": "pymongo",
            "layout": "mongodump",
            "replica_set": replica_set,
            "oplog_start": start_ts,
            "consistent_at": consistent_at,
            "oplog_entries": oplog_entries,
            "dump_started_at": started.isoformat(),
            "warnings": warnings,
        }

    def metadata(self) -> dict[str, Any]:
        return self._metadata

    def tool_versions(self) -> dict[str, str]:
        from importlib import metadata

        return {"pymongo": metadata.version("pymongo"), "mongodb_server": self._server_version}


class _BytesReader:
    def __init__(self, data: bytes):
        self._data = memoryview(data)

    def read(self, size: int = -1) -> bytes:
        size = len(self._data) if size < 0 else size
        chunk, self._data = bytes(self._data[:size]), self._data[size:]
        return chunk


def _metadata_document(client: Any, namespace: Namespace) -> dict[str, Any]:
    """What mongodump writes beside a collection: its indexes, options, uuid and type."""
    from bson.son import SON

    indexes = []
    if namespace.type == "collection":
        for index in client[namespace.database][namespace.collection].list_indexes():
            spec = SON((k, v) for k, v in index.items() if k != "ns")
            indexes.append(spec)
    document: SON = SON()
    document["indexes"] = indexes
    if namespace.uuid:
        document["uuid"] = namespace.uuid
    document["collectionName"] = namespace.collection
    document["type"] = namespace.type
    document["options"] = namespace.options
    return document


def _spool_collection(client: Any, namespace: Namespace, spool: BinaryIO) -> CollectionDigest:
    from bson import CodecOptions
    from bson.raw_bson import RawBSONDocument

    collection = client[namespace.database].get_collection(
        namespace.collection, codec_options=CodecOptions(document_class=RawBSONDocument)
    )
    digest = CollectionDigest()
    for document in collection.find({}, batch_size=BATCH_SIZE):
        raw = document.raw
        spool.write(raw)
        digest.add(raw)
    return digest


def _check_still_there(client: Any, namespace: Namespace, source: MongoSource) -> None:
    """A collection dropped (or dropped and made again) while it was read reads as a short or
    mixed collection, never as an error: ask the server afterwards."""
    now = collection_uuid(client, namespace.database, namespace.collection)
    if now is False:
        raise SourceError(
            f"source {source.name!r}: collection {namespace.name} vanished during the dump"
        )
    if namespace.uuid and now and now != namespace.uuid:
        raise SourceError(
            f"source {source.name!r}: collection {namespace.name} was dropped and created again "
            "during the dump"
        )


def read_metadata_json(raw: bytes, label: str) -> dict[str, Any]:
    from bson import json_util

    from spark_backup.errors import IntegrityError

    try:
        return json_util.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{label}: metadata is not extended JSON: {exc}") from None
