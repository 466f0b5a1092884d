"""The ``mongodb`` kind: what the contract asks of a kind, and the capabilities MongoDB has
(restore into databases, per-collection count and digest checks)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pyrage import x25519

from spark_backup.engine.manifest import Manifest
from spark_backup.engine.pipeline import PlaintextSource, open_copy
from spark_backup.engine.safe_tar import extract_tar
from spark_backup.engine.staging import staged_restore
from spark_backup.engine.streams import ProgressCallback, Readable
from spark_backup.errors import IntegrityError, UsageError
from spark_backup.sources.base import (
    Artifact,
    CopyRef,
    FolderRestore,
    RestoreTarget,
    RestoreTargets,
    Runtime,
    SemanticCheck,
    SemanticResult,
    SourceContext,
    SourceKind,
)
from spark_backup.sources.mongodb import ops
from spark_backup.sources.mongodb.dump import MongoDumpReader
from spark_backup.sources.mongodb.restore import check_dump_plaintext
from spark_backup.sources.mongodb.server import KIND_NAME, connected, list_namespaces
from spark_backup.sources.mongodb.settings import MongoSource

DUMP = "dump"
DATABASE_TARGET = "database"


class MongoKind(SourceKind[MongoSource], RestoreTargets, SemanticCheck):
    name = KIND_NAME
    settings = MongoSource
    labels = frozenset({"mongodb"})
    semantic_check_name = "collection_digests"

    # --- the contract ---------------------------------------------------------------------------

    def artifacts(self, source: MongoSource, context: SourceContext) -> list[Artifact]:
        return [
            Artifact(
                DUMP,
                source.cadence,
                context.max_age,
                primary=True,
                description=f"{source.cadence} dumps in mongodump's layout",
            )
        ]

    def artifact_of(self, manifest: Manifest) -> str:
        return DUMP

    def readers(
        self, source: MongoSource, context: SourceContext, artifact: str
    ) -> list[PlaintextSource]:
        if artifact != DUMP:
            raise UsageError(f"source {source.name!r} has no artifact {artifact!r} ({DUMP})")
        return [MongoDumpReader(source)]

    def probe(self, source: MongoSource, context: SourceContext) -> None:
        """Connect, authenticate and list what a dump would read."""
        with connected(source) as client:
            list_namespaces(client, source)

    def restore_to_folder(
        self,
        copy: CopyRef,
        identities: list[x25519.Identity],
        target: Path,
        options: FolderRestore,
    ) -> dict[str, Any]:
        """mongodump's directory layout, for ``mongorestore --dir``."""
        with (
            staged_restore(target, options.overwrite) as staging,
            open_copy(copy.store, copy.manifest, identities, options.progress) as plain,
        ):
            summary = extract_tar(plain, staging, options.skip_unsafe)
        return {"target": str(Path(os.path.abspath(target))), **vars(summary)}

    def check_plaintext(self, plain: Readable, manifest: Manifest) -> None:
        check_dump_plaintext(plain, manifest)

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
        own), compare every collection's document count and digest with the dump's, drop them."""
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
