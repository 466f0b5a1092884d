"""MongoDB's own operations over a plan, through the ``Runtime``: restore a dump into
databases, and the semantic check that reuses it."""

from __future__ import annotations

import datetime as dt
import secrets
from pathlib import Path
from typing import Any

from pyrage import x25519

from spark_backup.engine.cadence import utcnow
from spark_backup.engine.pipeline import open_copy
from spark_backup.engine.streams import ProgressCallback, Readable
from spark_backup.errors import SparkBackupError, UsageError
from spark_backup.sources.base import CopyRef, Runtime, SourceKind, source_of_kind
from spark_backup.sources.mongodb import oplog
from spark_backup.sources.mongodb.apply import OplogApplier
from spark_backup.sources.mongodb.bsonfile import iter_documents
from spark_backup.sources.mongodb.pitr import (
    MongoPitrReport,
    choose_base,
    describe,
    slices_to_replay,
    within,
)
from spark_backup.sources.mongodb.pitr_options import LATEST
from spark_backup.sources.mongodb.restore import (
    DatabaseRestore,
    compare_collections,
    database_mapping,
    renamed_namespaces,
)
from spark_backup.sources.mongodb.server import connected
from spark_backup.sources.mongodb.settings import MongoSource
from spark_backup.sources.mongodb.slices import is_slice

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
    with connected(source, runtime.context(source).secrets) as client:
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
    with connected(source, runtime.context(source).secrets) as client:
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


def point_in_time_restore(
    runtime: Runtime,
    source: MongoSource,
    target_time: dt.datetime | None,
    into: str,
    *,
    identities: list[x25519.Identity],
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> MongoPitrReport:
    """Restore the newest dump consistent before ``target_time`` (None: the end of the saved
    oplog) into new databases (``into``: NAME or SRC=DST,...), replay its oplog and the slices
    after it up to the target; a failure drops every database it created."""
    if target_time is not None and target_time > utcnow():
        raise UsageError(
            f"--to-time {target_time.isoformat()} is in the future; use 'latest' for the end of "
            "the saved oplog"
        )
    started = utcnow()
    refs = runtime.copies(source.name)
    dumps = {r.manifest.id: r for r in refs if not is_slice(r.manifest)}
    saved = {r.manifest.id: r for r in refs if is_slice(r.manifest)}
    base = choose_base([r.manifest for r in dumps.values()], target_time, source.name)
    chain = slices_to_replay(base, [r.manifest for r in saved.values()], target_time, source.name)
    mapping = database_mapping(base, into)
    report = MongoPitrReport(
        source.name,
        base.id,
        target_time.isoformat() if target_time else LATEST,
        mapping,
        slices=[m.id for m in chain],
        reached_ts=base.source_metadata["consistent_at"],
    )
    import bson  # with pymongo, loaded only by the commands that talk to a server

    label = f"source {source.name!r}"
    with connected(source, runtime.context(source).secrets) as client:
        job = DatabaseRestore(client, mapping, f"copy {base.id}")
        job.check_targets(force, protected=set(base.source_metadata.get("databases", [])))
        applier = OplogApplier(client, mapping)

        def replay(stream: Readable) -> None:
            for raw in iter_documents(stream, f"{label}: oplog"):
                entry = bson.decode(raw)
                ts = oplog.ts_json(entry["ts"])
                if not within(ts, target_time):
                    return  # the rest is after the target (open_copy still reads it all)
                applier.apply(entry)
                if report.reached_ts is None or oplog.ts_key(ts) > oplog.ts_key(report.reached_ts):
                    report.reached_ts = ts

        try:
            with open_copy(dumps[base.id].store, base, identities, progress) as plain:
                job.restore(plain, replay_oplog=replay)
            for manifest in chain:
                with open_copy(saved[manifest.id].store, manifest, identities) as plain:
                    replay(plain)
            report.documents = {ns: d.documents for ns, d in job.digests().items()}
        except BaseException as exc:
            job.drop_created()
            if isinstance(exc, SparkBackupError):
                report.error = str(exc)
            raise
    report.entries_applied = applier.applied
    report.reached_time = describe(report.reached_ts)
    report.seconds = round((utcnow() - started).total_seconds(), 3)
    report.ok = True
    return report
