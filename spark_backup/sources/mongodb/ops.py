"""MongoDB's own operations over a plan, through the ``Runtime``: restore a dump into
databases, and the semantic check that reuses it."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from pyrage import x25519

from spark_backup.engine.pipeline import open_copy, utcnow
from spark_backup.engine.streams import ProgressCallback
from spark_backup.sources.base import CopyRef, Runtime, SourceKind, source_of_kind
from spark_backup.sources.mongodb.restore import (
    DatabaseRestore,
    compare_collections,
    database_mapping,
    renamed_namespaces,
)
from spark_backup.sources.mongodb.server import connected
from spark_backup.sources.mongodb.settings import MongoSource

CHECK_DATABASE_PREFIX = "sbcheck_"


def mongo_source(runtime: Runtime, kind: SourceKind, name: str | None = None) -> MongoSource:
    """The named MongoDB source, or the plan's only one when no name is given."""
    source = source_of_kind(runtime, kind, name)
    assert isinstance(source, MongoSource)
    return source


def restore_to_database(
    runtime: Runtime,
    copy: CopyRef,
    value: str,
    *,
    identities: list[x25519.Identity],
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Restore a dump into new databases on the source's server (``NAME``, or ``SRC=DST,...``)
    and check every collection's count and digest against the manifest; a failed restore or
    check drops every database it created."""
    manifest = copy.manifest
    source = runtime.source(manifest.source)
    assert isinstance(source, MongoSource)
    mapping = database_mapping(manifest, value)
    started = utcnow()
    with connected(source) as client:
        job = DatabaseRestore(client, mapping, f"copy {manifest.id}")
        job.check_targets(force, protected=set(manifest.source_metadata.get("databases", [])))
        try:
            with open_copy(copy.store, manifest, identities, progress) as plain:
                job.restore(plain)
            counts = compare_collections(
                manifest, job.digests(), renamed_namespaces(manifest, mapping)
            )
        except BaseException:
            job.drop_created()
            raise
    return {
        "copy_id": manifest.id,
        "source": source.name,
        "databases": mapping,
        "collections": len(counts),
        "documents": sum(counts.values()),
        "seconds": round((utcnow() - started).total_seconds(), 3),
    }


def check_by_restoring(
    runtime: Runtime, copy: CopyRef, identities: list[x25519.Identity], scratch: Path
) -> dict[str, int]:
    """Restore the dump into scratch databases on the source's server, compare every
    collection's count and digest with the manifest, and drop them again."""
    manifest = copy.manifest
    databases = manifest.source_metadata.get("databases", [])
    token = secrets.token_hex(4)
    mapping = {db: f"{CHECK_DATABASE_PREFIX}{token}_{i}" for i, db in enumerate(databases)}
    source = runtime.source(manifest.source)
    assert isinstance(source, MongoSource)
    with connected(source) as client:
        job = DatabaseRestore(client, mapping, f"copy {manifest.id}")
        job.created = list(mapping.values())
        try:
            with open_copy(copy.store, manifest, identities) as plain:
                job.restore(plain)
            return compare_collections(
                manifest, job.digests(), renamed_namespaces(manifest, mapping)
            )
        finally:
            job.drop_created()
