"""The ``mongodb`` kind: what the contract asks of a kind, and the capabilities MongoDB has
(oplog slices as a continuous log, restore into databases, per-collection count and digest
checks)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pyrage import x25519

from spark_backup.engine.cadence import cadence
from spark_backup.engine.manifest import Manifest, manifest_key
from spark_backup.engine.pipeline import PlaintextSource, open_copy
from spark_backup.engine.safe_tar import extract_tar
from spark_backup.engine.staging import staged_restore
from spark_backup.engine.streams import ProgressCallback, Readable, copy_stream
from spark_backup.errors import IntegrityError, SparkBackupError, UsageError
from spark_backup.sources.base import (
    Artifact,
    ContinuousLog,
    CopyRef,
    FolderRestore,
    LogStatus,
    Observable,
    Observation,
    PointInTimeRecovery,
    RecoveryTarget,
    RecoveryWindow,
    RestoreTarget,
    RestoreTargets,
    Runtime,
    SemanticCheck,
    SemanticResult,
    SourceContext,
    SourceKind,
)
from spark_backup.sources.mongodb import oplog, ops, slices
from spark_backup.sources.mongodb.bsonfile import CollectionDigest, iter_documents
from spark_backup.sources.mongodb.dump import OPLOG_FILE, MongoDumpReader
from spark_backup.sources.mongodb.mongodump_tool import MongodumpToolReader, mongodump_path
from spark_backup.sources.mongodb.restore import check_dump_plaintext
from spark_backup.sources.mongodb.server import (
    KIND_NAME,
    connected,
    is_replica_set,
    list_namespaces,
)
from spark_backup.sources.mongodb.settings import MongoSource

DUMP = "dump"
OPLOG = "oplog"
DATABASE_TARGET = "database"


class MongoKind(
    SourceKind[MongoSource],
    Observable,
    ContinuousLog,
    PointInTimeRecovery,
    RestoreTargets,
    SemanticCheck,
):
    name = KIND_NAME
    settings = MongoSource
    labels = frozenset({"mongodb"})
    log_name = "oplog"
    log_asset_suffix = OPLOG
    lag_check_name = "oplog_lag"
    base_artifact = DUMP
    log_artifact = OPLOG
    semantic_check_name = "collection_digests"

    # --- the contract ---------------------------------------------------------------------------

    def artifacts(self, source: MongoSource, context: SourceContext) -> list[Artifact]:
        found = [
            Artifact(
                DUMP,
                source.cadence,
                context.max_age,
                primary=True,
                description=f"{source.cadence} dumps in mongodump's layout",
            )
        ]
        if source.oplog.enabled:
            interval = cadence(source.slice_cadence).length
            found.append(
                Artifact(
                    OPLOG,
                    source.slice_cadence,
                    source.oplog.max_age or 2 * interval,
                    primary=False,
                    description=f"oplog slices every {source.slice_cadence} (RPO)",
                    expires_with_base=True,
                )
            )
        return found

    def artifact_of(self, manifest: Manifest) -> str:
        return OPLOG if slices.is_slice(manifest) else DUMP

    def expected_parts(self, artifact: str, copies: Sequence[Manifest]) -> set[str]:
        return {slices.OPLOG_PART} if artifact == OPLOG else {""}

    def readers(
        self, source: MongoSource, context: SourceContext, artifact: str
    ) -> list[PlaintextSource]:
        if artifact == DUMP:
            if source.dump_tool == "mongodump":
                return [MongodumpToolReader(source, context.secrets)]
            return [MongoDumpReader(source, context.secrets)]
        if artifact == OPLOG and source.oplog.enabled:
            assert context.copies is not None, "a slice resumes from the copies in the store"
            return [
                slices.OplogSliceReader(
                    source, context.copies(OPLOG), context.copies(DUMP), context.secrets
                )
            ]
        raise UsageError(f"source {source.name!r} has no artifact {artifact!r}")

    def probe(self, source: MongoSource, context: SourceContext) -> None:
        """Connect, authenticate and list what a dump would read (and find mongodump, if the
        plan asks for it)."""
        if source.dump_tool == "mongodump":
            mongodump_path(source)
        with connected(source, context.secrets) as client:
            list_namespaces(client, source)

    def restore_to_folder(
        self,
        copy: CopyRef,
        identities: list[x25519.Identity],
        target: Path,
        options: FolderRestore,
    ) -> dict[str, Any]:
        """A dump: mongodump's directory layout, for ``mongorestore --dir``. A slice: its
        entries as ``oplog.bson``, for ``mongorestore --oplogReplay``."""
        with (
            staged_restore(target, options.overwrite) as staging,
            open_copy(
                copy.store, copy.manifest, identities, options.progress, options.worker
            ) as plain,
        ):
            if slices.is_slice(copy.manifest):
                with open(staging / OPLOG_FILE, "wb") as out:
                    written = copy_stream(plain, out)
                summary = {"files": 1, "directories": 0, "symlinks": 0, "bytes": written}
            else:
                summary = vars(extract_tar(plain, staging, options.skip_unsafe))
        return {"target": str(Path(os.path.abspath(target))), **summary}

    def check_plaintext(self, plain: Readable, manifest: Manifest) -> None:
        if not slices.is_slice(manifest):
            check_dump_plaintext(plain, manifest)
            return
        digest = CollectionDigest()
        for raw in iter_documents(plain, f"copy {manifest.id}"):
            digest.add(raw)
        recorded = manifest.source_metadata
        if (digest.documents, digest.digest) != (recorded["entries"], recorded["digest"]):
            raise IntegrityError(
                f"copy {manifest.id}: {digest.documents} oplog entries, the slice recorded "
                f"{recorded['entries']} (or their digest differs)"
            )

    def asset_suffixes(self, source: MongoSource) -> tuple[str, ...]:
        return (OPLOG,)

    def cli_commands(self) -> Sequence[Any]:
        from spark_backup.sources.mongodb.cli import COMMANDS

        return COMMANDS

    # --- Observable -----------------------------------------------------------------------------

    def observe(self, source: MongoSource, context: SourceContext) -> Observation:
        """A replica set: its newest oplog write (no-ops left out). A standalone server: the
        protected namespaces with their estimated document counts."""
        with connected(source, context.secrets) as client:
            if is_replica_set(client) and (newest := oplog.newest_write_ts(client)):
                version = f"{newest['t']}:{newest['i']}"
                return Observation(version, {"oplog_ts": version})
            counts = {
                ns.name: client[ns.database][ns.collection].estimated_document_count()
                for ns in list_namespaces(client, source)
                if ns.type == "collection"
            }
        digest = hashlib.sha256(json.dumps(counts, sort_keys=True).encode()).hexdigest()[:16]
        return Observation(digest, {"collections": len(counts), "documents": sum(counts.values())})

    # --- ContinuousLog --------------------------------------------------------------------------

    def log_enabled(self, source: MongoSource) -> bool:
        return source.oplog.enabled

    def lag(self, runtime: Runtime, source: MongoSource, now: dt.datetime) -> LogStatus:
        """From the newest slice's read time; zero when the server has written nothing since
        (an idle replica set must not look behind). A gap between slices, or an oplog that
        rolled over past the newest slice, fails the check whatever the lag."""
        saved = [ref.manifest for ref in runtime.copies(source.name, OPLOG)]
        newest = max(saved, key=slices.slice_order, default=None)
        through = slices.saved_through(saved)
        status = LogStatus(
            source=source.name,
            rpo=source.rpo,
            now=now,
            lag=max(now - through, dt.timedelta(0)) if through else None,
            newest=newest.id if newest else None,
            problems=[gap.describe() for gap in slices.chain_gaps(saved)],
        )
        if newest is None:
            return status
        last = newest.source_metadata["last_ts"]
        status.details["last_saved_ts"] = f"{last['t']}:{last['i']}"
        try:
            with connected(source, runtime.context(source).secrets) as client:
                server_newest = oplog.newest_ts(client)
                server_oldest = oplog.oldest_ts(client)
        except SparkBackupError as exc:
            status.source_error = str(exc)
            return status
        if server_oldest and oplog.ts_key(server_oldest) > oplog.ts_key(last):
            status.problems.append(
                f"the oplog rolled over past the newest slice's end {last} (oldest entry now "
                f"{server_oldest}): writes since are lost to point-in-time restore until the "
                "next dump"
            )
        elif server_newest and oplog.ts_key(server_newest) <= oplog.ts_key(last):
            status.lag = dt.timedelta(0)  # nothing written since the newest slice
        return status

    def expire(
        self,
        runtime: Runtime,
        source: MongoSource,
        kept_bases: Sequence[Manifest],
        now: dt.datetime,
        dry_run: bool,
    ) -> list[str]:
        """Slices no kept dump replays them onto: manifest first, then data; none under a lock."""
        store = runtime.store_for(source)
        saved = [ref.manifest for ref in runtime.copies(source.name, OPLOG)]
        expired = []
        for manifest in slices.expendable_slices(saved, kept_bases):
            key = manifest_key(manifest.source, manifest.id)
            if store.locked(key, now) or store.locked(manifest.data_key, now):
                continue
            expired.append(key)
            if not dry_run:
                store.delete(key)
                store.delete(manifest.data_key)
        return expired

    def owns_key(self, key: str) -> bool:
        return False  # slices are copies: data and manifest keys like every copy's

    # --- PointInTimeRecovery --------------------------------------------------------------------

    def recover(
        self,
        runtime: Runtime,
        source: MongoSource,
        target: RecoveryTarget,
        target_dir: Path,
        *,
        identity_file: str | Path | None = None,
        stop_after: bool = False,
        progress: ProgressCallback | None = None,
    ) -> Any:
        """Into new databases (``target.into``: NAME or SRC=DST,...) on the source's server;
        the report is also written to ``target_dir/mongo-pitr.json``."""
        if not target.into:
            raise UsageError("a MongoDB point-in-time restore needs target databases (--to-db)")
        report = ops.point_in_time_restore(
            runtime,
            source,
            target.time,
            target.into,
            identities=runtime.identities(identity_file),
            progress=progress,
        )
        target_dir.mkdir(parents=True, exist_ok=True)
        (target_dir / "mongo-pitr.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
        return report

    def recovery_window(self, runtime: Runtime, source: MongoSource) -> RecoveryWindow:
        """From the oldest dump with an oplog position to the end of the unbroken chain of
        slices after the newest one."""
        refs = runtime.copies(source.name)
        dumps = [r.manifest for r in refs if not slices.is_slice(r.manifest)]
        saved = [r.manifest for r in refs if slices.is_slice(r.manifest)]
        positioned = [m for m in dumps if m.source_metadata.get("consistent_at")]
        if not positioned:
            return RecoveryWindow(None, None, {"dumps": len(dumps), "positioned_dumps": 0})
        consistent = [oplog.ts_time(m.source_metadata["consistent_at"]) for m in positioned]
        newest = max(positioned, key=lambda m: oplog.ts_key(m.source_metadata["consistent_at"]))
        latest = oplog.ts_time(newest.source_metadata["consistent_at"])
        covered = oplog.ts_key(newest.source_metadata["consistent_at"])
        details: dict[str, Any] = {"dumps": len(positioned), "slices": len(saved)}
        for manifest in sorted(saved, key=slices.slice_order):
            if slices.slice_order(manifest) <= covered:
                continue
            if oplog.ts_key(manifest.source_metadata["after_ts"]) > covered:
                details["gap_before"] = manifest.id
                break
            covered = slices.slice_order(manifest)
            latest = dt.datetime.fromisoformat(manifest.source_metadata["read_at"])
        return RecoveryWindow(min(consistent), latest, details)

    # --- RestoreTargets -------------------------------------------------------------------------

    def restore_targets(self) -> Sequence[RestoreTarget]:
        return [
            RestoreTarget(
                DATABASE_TARGET,
                "--to-db",
                "NAME",
                "MongoDB dumps: new databases on the source's server (NAME, or SRC=DST,...).",
                {"force": "--to-db: write into an existing database (or a source database)."},
            )
        ]

    def restore_to_target(
        self,
        runtime: Runtime,
        target: str,
        copy: CopyRef,
        value: str,
        *,
        identity_file: str | Path | None = None,
        flags: Mapping[str, bool] | None = None,
        progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        if target != DATABASE_TARGET:
            raise UsageError(f"a {self.name} copy cannot be restored into a {target}")
        return ops.restore_to_database(
            runtime,
            copy,
            value,
            identities=runtime.identities(identity_file),
            force=(flags or {}).get("force", False),
            progress=progress,
        )

    # --- SemanticCheck --------------------------------------------------------------------------

    def semantic_check(
        self,
        runtime: Runtime,
        copy: CopyRef,
        identities: list[x25519.Identity],
        scratch: Path,
    ) -> SemanticResult:
        """Restore the dump into scratch databases on the source's server (never the source's
        own), compare every collection's document count and digest with the dump's, drop them.
        A slice: every entry parses, and their count and digest are the manifest's."""
        if slices.is_slice(copy.manifest):
            try:
                with open_copy(copy.store, copy.manifest, identities) as plain:
                    self.check_plaintext(plain, copy.manifest)
            except IntegrityError as exc:
                return SemanticResult(False, str(exc), {})
            entries = copy.manifest.source_metadata["entries"]
            return SemanticResult(
                True, f"{entries} oplog entries, digest equal", {"entries": entries}
            )
        try:
            counts = ops.check_by_restoring(runtime, copy, identities, scratch)
        except IntegrityError as exc:
            return SemanticResult(False, str(exc), {})
        return SemanticResult(
            True,
            f"{len(counts)} collections hold the {sum(counts.values())} documents the dump "
            "recorded, digests equal",
            {"collections": len(counts), "documents": sum(counts.values())},
        )
