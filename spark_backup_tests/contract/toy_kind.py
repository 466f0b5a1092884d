"""A kind defined only here, in the tests: one file per copy. It registers at run time and must
get an asset, its checks, a CLI listing and retention without a change anywhere else."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pyrage import x25519

from spark_backup.engine.manifest import Manifest
from spark_backup.engine.pipeline import open_copy
from spark_backup.engine.staging import staged_restore
from spark_backup.engine.streams import Readable, copy_stream
from spark_backup.errors import IntegrityError, SourceError
from spark_backup.plan.source import SourceSettings
from spark_backup.sources.base import (
    Artifact,
    CopyRef,
    FolderRestore,
    Runtime,
    SemanticCheck,
    SemanticResult,
    SourceContext,
    SourceKind,
)

TOY = "toy_blob"
BLOB = "blob"
MAGIC = b"TOY1"


class ToyBlobSource(SourceSettings):
    kind: Literal["toy_blob"]
    path: str


class _BlobReader:
    kind = TOY

    def __init__(self, path: Path):
        self.path = path
        self.layers = ["blob"]
        self.digest = ""

    @contextmanager
    def open(self) -> Iterator[Readable]:
        if not os.access(self.path, os.R_OK):
            raise SourceError(f"cannot read {self.path}")
        with open(self.path, "rb") as handle:
            yield handle
        self.digest = hashlib.sha256(self.path.read_bytes()).hexdigest()

    def metadata(self) -> dict[str, Any]:
        return {"file": self.path.name, "sha256": self.digest}

    def tool_versions(self) -> dict[str, str]:
        return {}


class ToyBlobKind(SourceKind[ToyBlobSource], SemanticCheck):
    name = TOY
    settings = ToyBlobSource
    labels = frozenset({"blob"})
    semantic_check_name = "magic"

    def artifacts(self, source: ToyBlobSource, context: SourceContext) -> list[Artifact]:
        return [Artifact(BLOB, source.cadence, context.max_age, primary=True)]

    def artifact_of(self, manifest: Manifest) -> str:
        return BLOB

    def readers(self, source: ToyBlobSource, context: SourceContext, artifact: str) -> list:
        return [_BlobReader(context.resolve(source.path))]

    def probe(self, source: ToyBlobSource, context: SourceContext) -> None:
        if not os.access(context.resolve(source.path), os.R_OK):
            raise SourceError(f"source {source.name!r}: cannot read {source.path}")

    def restore_to_folder(
        self, copy: CopyRef, identities: list[x25519.Identity], target: Path, options: FolderRestore
    ) -> dict[str, Any]:
        name = copy.manifest.source_metadata["file"]
        with (
            staged_restore(target, options.overwrite) as staging,
            open_copy(copy.store, copy.manifest, identities, options.progress) as plain,
            open(staging / name, "wb") as out,
        ):
            written = copy_stream(plain, out)
        return {
            "target": str(target),
            "files": 1,
            "directories": 0,
            "symlinks": 0,
            "bytes": written,
        }

    def check_plaintext(self, plain: Readable, manifest: Manifest) -> None:
        if plain.read(len(MAGIC)) != MAGIC:
            raise IntegrityError(f"copy {manifest.id}: not a toy blob")

    def semantic_check(
        self, runtime: Runtime, copy: CopyRef, identities: list[x25519.Identity], scratch: Path
    ) -> SemanticResult:
        summary = self.restore_to_folder(copy, identities, scratch / "blob", FolderRestore())
        restored = Path(summary["target"]) / copy.manifest.source_metadata["file"]
        digest = hashlib.sha256(restored.read_bytes()).hexdigest()
        restored.unlink()
        restored.parent.rmdir()
        passed = digest == copy.manifest.source_metadata["sha256"]
        return SemanticResult(passed, "the blob's digest matches" if passed else "digest differs")


KIND = ToyBlobKind()
