"""The ``mongodb`` kind: daily dumps in mongodump's layout, oplog slices between them, and
restores into databases checked by per-collection counts and digests.

- ``kind.py``: the contract and MongoDB's capabilities;
- ``settings.py``: the plan model;
- ``server.py``: connections (password from the environment) and pymongo's errors;
- ``dump.py``: the dump as a tar stream of ``<db>/<collection>.bson`` and ``.metadata.json``;
- ``bsonfile.py``: BSON files and the order-independent content digest;
- ``restore.py``: deep verify and restore into databases;
- ``oplog.py``: reading ``local.oplog.rs``;
- ``ops.py``: those operations over a plan.
"""

from spark_backup.sources.mongodb.kind import MongoKind

KIND = MongoKind()
