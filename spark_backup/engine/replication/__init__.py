"""Replication of versions to a second target: another store (a second bucket or endpoint) or
an OCI registry (a ModelPack-style artifact pushed with the ``oras`` client).

Generic over what is replicated: a ``ReplicaVersion`` is a named set of files with their sha256
digests and a way to stream each. A copy of the archive pipeline is one version (its data
object and its manifest, ``copy_version``); a kind that keeps versions otherwise (the
content-addressed blob layer: every chunk a version needs and its reference list, before its
document and manifest) builds its own ``ReplicaVersion`` and gets the same targets, records and
``replicated`` check.

- ``version.py``: ``ReplicaFile``, ``ReplicaVersion``, ``copy_version``;
- ``config.py``: the targets as a plan writes them;
- ``records.py``: replica records, beside the copy in its own store;
- ``targets.py``: the target interface and the store target;
- ``oci.py``: the OCI registry target (``oras``, imported when a push or check runs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spark_backup.lazy import lazy_exports

if TYPE_CHECKING:
    from spark_backup.engine.replication.config import (
        OciReplicaConfig,
        ReplicaConfig,
        StoreReplicaConfig,
    )
    from spark_backup.engine.replication.records import (
        ReplicaRecord,
        newest_records,
        write_record,
    )
    from spark_backup.engine.replication.targets import ReplicaTarget, StoreReplica
    from spark_backup.engine.replication.version import ReplicaFile, ReplicaVersion, copy_version

# The plan reads ``config.py``; records, targets and versions load where a copy is replicated.
_HOMES = {
    "OciReplicaConfig": "spark_backup.engine.replication.config",
    "ReplicaConfig": "spark_backup.engine.replication.config",
    "StoreReplicaConfig": "spark_backup.engine.replication.config",
    "ReplicaRecord": "spark_backup.engine.replication.records",
    "newest_records": "spark_backup.engine.replication.records",
    "write_record": "spark_backup.engine.replication.records",
    "ReplicaTarget": "spark_backup.engine.replication.targets",
    "StoreReplica": "spark_backup.engine.replication.targets",
    "ReplicaFile": "spark_backup.engine.replication.version",
    "ReplicaVersion": "spark_backup.engine.replication.version",
    "copy_version": "spark_backup.engine.replication.version",
}

__getattr__ = lazy_exports(__name__, _HOMES, globals())

__all__ = [
    "OciReplicaConfig",
    "ReplicaConfig",
    "ReplicaFile",
    "ReplicaRecord",
    "ReplicaTarget",
    "ReplicaVersion",
    "StoreReplica",
    "StoreReplicaConfig",
    "copy_version",
    "newest_records",
    "write_record",
]
