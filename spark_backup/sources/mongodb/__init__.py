"""The ``mongodb`` kind: daily dumps in mongodump's layout, oplog slices between them, and
restores into databases checked by per-collection counts and digests.

- ``kind.py``: the contract and MongoDB's capabilities;
- ``settings.py``: the plan model;
- ``server.py``: connections (the password from the plan's secret reference) and pymongo's errors;
- ``dump.py``: the dump as a tar stream of ``<db>/<collection>.bson`` and ``.metadata.json``;
- ``bsonfile.py``: BSON files and the order-independent content digest;
- ``restore.py``: deep verify and restore into databases;
- ``oplog.py``: reading ``local.oplog.rs``;
- ``slices.py``: oplog slices, their chain, gaps and expiry;
- ``apply.py``, ``pitr.py``: oplog replay and point-in-time restore;
- ``mongodump_tool.py``: ``dump_tool: mongodump``;
- ``ops.py``: those operations over a plan; ``cli.py``: the kind's commands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spark_backup.sources.mongodb.kind import MongoKind

    KIND: MongoKind


def __getattr__(name: str) -> object:
    # The kind loads when first asked for, so that ``spark_backup.sources.mongodb.cli`` (the
    # kind's commands, listed by ``--help``) can be imported without it or pymongo.
    if name == "KIND":
        from spark_backup.sources.mongodb.kind import MongoKind

        global KIND
        KIND = MongoKind()
        return KIND
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
