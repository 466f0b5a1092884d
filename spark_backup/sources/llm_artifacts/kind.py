"""The ``llm_artifacts`` kind: each backup of a model directory is a version (a digest of its
files and a label), whose files are chunks in the source's chunk store (engine/blobs) and whose
copy holds the version document. Restore reassembles every file and checks its sha256; deep
verify and the semantic check parse every safetensors header again and compare every tensor's
bytes with the digest recorded at backup."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pyrage import x25519

from spark_backup.engine.blobs.safetensors import SafetensorsError, read_header
from spark_backup.engine.blobs.version import parse_version
from spark_backup.engine.manifest import Manifest
from spark_backup.engine.staging import remove_tree
from spark_backup.engine.streams import Readable
from spark_backup.errors import IntegrityError, SourceError, UsageError
from spark_backup.sources.base import (
    Artifact,
    CopyRef,
    FolderRestore,
    Observable,
    Observation,
    Runtime,
    SemanticCheck,
    SemanticResult,
    SourceContext,
    SourceKind,
)
from spark_backup.sources.blob_versions import (
    CHUNK_MEDIA_TYPE,
    CHUNKS_DEEP,
    CHUNKS_PRESENT,
    PACK_MEDIA_TYPE,
    REFS_MEDIA_TYPE,
    BlobVersions,
    read_document,
    restore_version,
)
from spark_backup.sources.llm_artifacts.checks import check_file
from spark_backup.sources.llm_artifacts.reader import ModelVersionReader, walk_model
from spark_backup.sources.llm_artifacts.settings import KIND_NAME, LlmArtifactsSource

__all__ = [
    "CHUNKS_DEEP",
    "CHUNKS_PRESENT",
    "CHUNK_MEDIA_TYPE",
    "PACK_MEDIA_TYPE",
    "REFS_MEDIA_TYPE",
    "LlmArtifactsKind",
    "read_document",
]

VERSION = "version"


class LlmArtifactsKind(SourceKind[LlmArtifactsSource], Observable, SemanticCheck, BlobVersions):
    name = KIND_NAME
    settings = LlmArtifactsSource
    labels = frozenset({"safetensors"})
    semantic_check_name = "tensor_digests"

    # --- the contract ---------------------------------------------------------------------------

    def artifacts(self, source: LlmArtifactsSource, context: SourceContext) -> list[Artifact]:
        return [
            Artifact(
                VERSION,
                source.cadence,
                context.max_age,
                primary=True,
                description=f"{source.cadence} deduplicated versions of {source.path}",
            )
        ]

    def artifact_of(self, manifest: Manifest) -> str:
        return VERSION

    def readers(
        self, source: LlmArtifactsSource, context: SourceContext, artifact: str = VERSION
    ) -> list[ModelVersionReader]:
        if artifact != VERSION:
            raise UsageError(f"source {source.name!r} has no artifact {artifact!r} ({VERSION})")
        if context.store_access is None:
            raise SourceError(f"source {source.name!r}: a backup needs the source's store")
        secret = context.secrets.resolve_for(f"source {source.name!r} chunk_key", source.chunk_key)
        if len(secret.encode()) < 16:
            raise SourceError(f"source {source.name!r}: chunk_key must be at least 16 bytes")
        return [
            ModelVersionReader(source, context.resolve(source.path), context.store_access(), secret)
        ]

    def probe(self, source: LlmArtifactsSource, context: SourceContext) -> None:
        """List the directory and parse every safetensors header, reading no weights."""
        root = context.resolve(source.path)
        for name in walk_model(root):
            if name.endswith(".safetensors"):
                path = root / name
                with open(path, "rb") as handle:
                    try:
                        read_header(handle, os.fstat(handle.fileno()).st_size, str(path))
                    except SafetensorsError as exc:
                        raise SourceError(str(exc)) from None

    def restore_to_folder(
        self,
        copy: CopyRef,
        identities: list[x25519.Identity],
        target: Path,
        options: FolderRestore,
    ) -> dict[str, Any]:
        """Every file reassembled from its chunks into staging, each chunk's and each file's
        sha256 checked, published only when all matched."""
        return restore_version(copy, identities, target, options)

    def check_plaintext(self, plain: Readable, manifest: Manifest) -> None:
        """The version document must parse and be the version the manifest names."""
        document = parse_version(plain.read(), f"version {manifest.id}")
        if document["digest"] != manifest.source_metadata.get("version_digest"):
            raise IntegrityError(f"version {manifest.id}: its digest differs from the manifest's")

    def observe(self, source: LlmArtifactsSource, context: SourceContext) -> Observation:
        files = walk_model(context.resolve(source.path))
        digest = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()[:16]
        return Observation(
            digest, {"files": len(files), "bytes": sum(f[1] for f in files.values())}
        )

    def cli_commands(self) -> Sequence[Any]:
        from spark_backup.sources.llm_artifacts.cli import COMMANDS

        return COMMANDS

    # --- BlobVersions: the packs, deep verify and replication -------------------------------

    def _refs(self, copy: CopyRef) -> dict[str, int]:
        return self.version_refs(copy)

    def check_version_file(
        self, entry: dict[str, Any], chunks: Iterator[bytes], label: str
    ) -> None:
        check_file(entry, chunks, label)

    def version_annotations(self, manifest: Manifest) -> dict[str, str]:
        metadata = manifest.source_metadata
        return {
            "dev.spark-backup.version-digest": str(metadata.get("version_digest") or ""),
            "dev.spark-backup.label": str(metadata.get("label") or ""),
        }

    # --- SemanticCheck ----------------------------------------------------------------------------

    def semantic_check(
        self,
        runtime: Runtime,
        copy: CopyRef,
        identities: list[x25519.Identity],
        scratch: Path,
    ) -> SemanticResult:
        """Restore into ``scratch``, then read every restored file as a user would: parse each
        safetensors header and hash every tensor against the digest recorded at backup, load the
        tokenizer, read NeMo archives as tar."""
        target = scratch / "model"
        counts: dict[str, int] = {}
        try:
            self.restore_to_folder(copy, identities, target, FolderRestore())
            document = read_document(copy, identities)
            for entry in document["files"]:
                for name, value in check_file(
                    entry, _read_file(target / entry["path"]), f"restored {copy.manifest.id}"
                ).items():
                    counts[name] = counts.get(name, 0) + value
        except IntegrityError as exc:
            return SemanticResult(False, str(exc), counts)
        finally:
            remove_tree(target)
        tensors = counts.get("tensors", 0)
        return SemanticResult(
            True,
            f"{len(document['files'])} files restored, {tensors} tensors equal to their digests"
            + (", tokenizer loads" if counts.get("tokenizers") else ""),
            {"files": len(document["files"]), **counts},
        )


def _read_file(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while data := handle.read(1 << 20):
            yield data
