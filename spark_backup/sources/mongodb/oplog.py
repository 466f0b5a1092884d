"""Reading a replica set's oplog (``local.oplog.rs``): its ends, and the entries after a saved
timestamp with a tailable cursor, filtered to the namespaces the plan protects.

Timestamps are kept in manifests as ``{"t": seconds, "i": increment}``, the oplog's own
ordering (``ts``), so that a slice continues exactly where the previous one (or a dump) ended.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

from spark_backup.sources.mongodb.settings import MongoSource

OPLOG_DATABASE = "local"
OPLOG_COLLECTION = "oplog.rs"
# Entries that change no data: no-op heartbeats.
_NOOP = "n"


def ts_json(ts: Any) -> dict[str, int]:
    return {"t": int(ts.time), "i": int(ts.inc)}


def ts_from_json(value: dict[str, int]) -> Any:
    from bson.timestamp import Timestamp

    return Timestamp(int(value["t"]), int(value["i"]))


def ts_key(value: dict[str, int]) -> tuple[int, int]:
    return int(value["t"]), int(value["i"])


def ts_time(value: dict[str, int]) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(value["t"]), dt.UTC)


def oplog_collection(client: Any, raw: bool = False) -> Any:
    from bson import CodecOptions
    from bson.raw_bson import RawBSONDocument

    database = client[OPLOG_DATABASE]
    if raw:
        return database.get_collection(
            OPLOG_COLLECTION, codec_options=CodecOptions(document_class=RawBSONDocument)
        )
    return database[OPLOG_COLLECTION]


def _end(client: Any, direction: int) -> dict[str, int] | None:
    entry = oplog_collection(client).find_one(
        {}, projection={"ts": 1}, sort=[("$natural", direction)]
    )
    return ts_json(entry["ts"]) if entry else None


def newest_ts(client: Any) -> dict[str, int] | None:
    return _end(client, -1)


def newest_write_ts(client: Any) -> dict[str, int] | None:
    """The newest entry that is not a no-op: an idle replica set still writes a no-op every
    10 seconds, which must not look like a change."""
    entry = oplog_collection(client).find_one(
        {"op": {"$ne": _NOOP}}, projection={"ts": 1}, sort=[("$natural", -1)]
    )
    return ts_json(entry["ts"]) if entry else None


def oldest_ts(client: Any) -> dict[str, int] | None:
    return _end(client, 1)


def entries_after(
    client: Any, after: dict[str, int], until: dict[str, int]
) -> Iterator[tuple[dict[str, int], Any]]:
    """``(ts, raw entry)`` for every entry with ``after < ts <= until``, in oplog order, read
    with a tailable cursor (it stops at the oplog's end instead of waiting for more)."""
    from pymongo import CursorType

    cursor = oplog_collection(client, raw=True).find(
        {"ts": {"$gt": ts_from_json(after), "$lte": ts_from_json(until)}},
        cursor_type=CursorType.TAILABLE,
    )
    try:
        for entry in cursor:
            yield ts_json(entry["ts"]), entry
    finally:
        cursor.close()


def protects(source: MongoSource, entry: Any) -> bool:
    """Whether replaying ``entry`` touches what the plan protects: CRUD on a dumped
    collection, a command on a dumped database, a transaction (``applyOps``) with any of
    those. No-ops are left out."""
    op = entry.get("op")
    if op == _NOOP:
        return False
    namespace = str(entry.get("ns", ""))
    database, _, collection = namespace.partition(".")
    if op == "c":
        inner = entry.get("o", {}).get("applyOps")
        if inner is not None:
            return any(protects(source, op_entry) for op_entry in inner)
        return source.wants_database(database)
    return source.wants_collection(database, collection)
