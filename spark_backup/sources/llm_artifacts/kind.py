"""The ``llm_artifacts`` kind: each backup of a model directory is a version (a digest of its
files and a label), whose files are chunks in the source's chunk store (engine/blobs) and whose
copy holds the version document. Restore reassembles every file and checks its sha256; deep
verify and the semantic check parse every safetensors header again and compare every tensor's
bytes with the digest recorded at backup."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from pyrage import x25519

from spark_backup.engine.blobs.chunks import id_of_chunk_key
from spark_backup.engine.blobs.packs import (
    PackCache,
    id_of_index_key,
    id_of_pack_key,
    index_prefix,
)
from spark_backup.engine.blobs.safetensors import SafetensorsError, read_header
from spark_backup.engine.blobs.sweep import sweep, sweeps_prefix
from spark_backup.engine.blobs.version import (
    iter_file,
    missing_objects,
    needed_objects,
    parse_version,
    read_refs,
    refs_prefix,
)
from spark_backup.engine.manifest import Manifest, manifest_prefix
from spark_backup.engine.pipeline import open_copy
from spark_backup.engine.replication import ReplicaFile, ReplicaVersion, copy_version
from spark_backup.engine.staging import remove_tree, staged_restore
from spark_backup.engine.streams import HashingReader, Readable
from spark_backup.errors import (
    IntegrityError,
    NotFoundError,
    RestoreRefused,
    SourceError,
    UsageError,
)
from spark_backup.sources.base import (
    Artifact,
    CopyRef,
    FolderRestore,
    Observable,
    Observation,
    Replicable,
    Runtime,
    SemanticCheck,
    SemanticResult,
    SharedObjects,
    SourceContext,
    SourceKind,
)
from spark_backup.sources.llm_artifacts.checks import check_file
from spark_backup.sources.llm_artifacts.reader import (
    REFS_KEY,
    REFS_SHA256,
    ModelVersionReader,
    walk_model,
)
from spark_backup.sources.llm_artifacts.settings import KIND_NAME, LlmArtifactsSource

VERSION = "version"
CHUNKS_PRESENT = "every chunk present"
CHUNKS_DEEP = "every chunk decrypted, file and tensor digests"

# Media types of a version's store objects in an OCI artifact (one layer per object).
PACK_MEDIA_TYPE = "application/vnd.spark-backup.pack.v1+age"
CHUNK_MEDIA_TYPE = "application/vnd.spark-backup.chunk.v1+age"  # first release's layout
REFS_MEDIA_TYPE = "application/vnd.spark-backup.chunk-refs.v1+json+zstd"


def read_document(copy: CopyRef, identities: list[x25519.Identity]) -> dict[str, Any]:
    """The copy's version document (small: names and chunk lists, never file contents)."""
    with open_copy(copy.store, copy.manifest, identities) as plain:
        data = plain.read()
    return parse_version(data, f"version {copy.manifest.id}")


class LlmArtifactsKind(
    SourceKind[LlmArtifactsSource], Observable, SemanticCheck, SharedObjects, Replicable
):
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
        document = read_document(copy, identities)
        label = f"version {copy.manifest.id}"
        files = size = 0
        cache = PackCache(copy.store, copy.manifest.source, identities)
        with staged_restore(target, options.overwrite) as staging:
            for entry in document["files"]:
                path = staging / entry["path"]
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                except OSError as exc:
                    raise RestoreRefused(
                        f"{label}: cannot restore {entry['path']}: {exc.strerror} (a name twice, "
                        "or a file where a folder must be)"
                    ) from None
                with os.fdopen(fd, "wb") as out:
                    for data in iter_file(
                        copy.store, copy.manifest.source, entry, identities, label, cache
                    ):
                        out.write(data)
                        if options.progress:
                            options.progress(len(data))
                os.chmod(path, entry.get("mode", 0o644) & 0o755)
                files += 1
                size += entry["size"]
        return {
            "target": str(Path(os.path.abspath(target))),
            "files": files,
            "directories": 0,
            "symlinks": 0,
            "bytes": size,
            "version_digest": document["digest"],
            "label": document.get("label"),
        }

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

    # --- SharedObjects: the chunks -------------------------------------------------------------

    def _refs(self, copy: CopyRef) -> dict[str, int]:
        metadata = copy.manifest.source_metadata
        try:
            return read_refs(
                copy.store,
                copy.manifest.source,
                metadata[REFS_KEY],
                metadata[REFS_SHA256],
                f"version {copy.manifest.id}",
            )
        except KeyError:
            raise IntegrityError(
                f"version {copy.manifest.id}: its manifest names no chunk reference list"
            ) from None
        except NotFoundError:
            raise IntegrityError(
                f"version {copy.manifest.id}: its chunk reference list "
                f"{metadata[REFS_KEY]} is missing from the store"
            ) from None

    def _broken_by(self, runtime: Runtime, copy: CopyRef, missing: list[str]) -> list[str]:
        """Every version of the source that needs one of the ``missing`` objects."""
        broken = []
        for other in runtime.copies(copy.manifest.source):
            try:
                refs = self._refs(other)
            except IntegrityError:
                continue
            if refs.keys() & set(missing):
                broken.append(other.manifest.id)
        return broken

    def check_shared(
        self, runtime: Runtime, copy: CopyRef, identities: list[x25519.Identity] | None
    ) -> list[str]:
        refs = self._refs(copy)
        missing = missing_objects(copy.store, copy.manifest.source, refs)
        if missing:
            broken = self._broken_by(runtime, copy, missing)
            names = ", ".join(m.removeprefix(f"{copy.manifest.source}/") for m in missing[:3])
            raise IntegrityError(
                f"version {copy.manifest.id}: {len(missing)} pack(s) or chunk(s) missing or "
                f"damaged in the store ({names}); versions broken: {', '.join(broken)}"
            )
        if not identities:
            return [CHUNKS_PRESENT]
        document = read_document(copy, identities)
        label = f"version {copy.manifest.id}"
        if needed_objects(document) != refs.keys():
            # Prune trusts the reference list: one that lacks a pack would let it go.
            raise IntegrityError(
                f"{label}: the chunk reference list does not list exactly the version's packs"
            )
        cache = PackCache(copy.store, copy.manifest.source, identities)
        for entry in document["files"]:
            check_file(
                entry,
                iter_file(copy.store, copy.manifest.source, entry, identities, label, cache),
                label,
            )
        return [CHUNKS_PRESENT, CHUNKS_DEEP]

    def collect(
        self,
        runtime: Runtime,
        source: LlmArtifactsSource,
        now: dt.datetime,
        grace: dt.timedelta,
        dry_run: bool,
    ) -> list[str]:
        """Mark every pack (and first-release chunk object) a listed version needs (kept or
        locked: every manifest still in the store), sweep the rest; remove reference lists no
        manifest names and indexes whose pack is gone. Deletes nothing when a manifest or a
        reference list cannot be read."""
        store = runtime.store_for(source)
        copies = runtime.copies(source.name)
        listed = {c.manifest.id for c in copies}
        keys = [i.key for i in store.list(manifest_prefix(source.name)) if i.key.endswith(".json")]
        if len(keys) != len(listed):
            return []  # a manifest that does not read: its chunks are unknown, so keep all
        referenced: set[str] = set()
        named: set[str] = set()
        for copy in copies:
            try:
                referenced |= self._refs(copy).keys()
            except IntegrityError:
                return []
            named.add(copy.manifest.source_metadata[REFS_KEY])
        report = sweep(store, source.name, referenced, now, grace, dry_run)
        removed = list(report.deleted)
        packs = {id_of_pack_key(i.key) for i in store.list(f"{source.name}/packs/")}
        for info in [*store.list(refs_prefix(source.name)), *store.list(index_prefix(source.name))]:
            if info.modified > now - grace:
                continue
            if info.key in named or id_of_index_key(info.key) in packs:
                continue
            removed.append(info.key)
            if not dry_run:
                store.delete(info.key)
        return removed

    def owns_shared_key(self, key: str) -> bool:
        parts = key.split("/")
        return len(parts) >= 3 and (
            (parts[1] == "chunks" and id_of_chunk_key(key) is not None)
            or (parts[1] == "packs" and id_of_pack_key(key) is not None)
            or (parts[1] == "pack-index" and id_of_index_key(key) is not None)
            or key.startswith((refs_prefix(parts[0]), sweeps_prefix(parts[0])))
        )

    # --- Replicable: a version as the store objects it is made of ------------------------------

    def replica_version(self, copy: CopyRef) -> ReplicaVersion:
        """Every pack the version needs, its chunk reference list, then its version document
        and manifest (``copy_version``): the manifest last, so a store replica lists a version
        only once it holds everything the version needs, and lists, verifies and restores it as
        the source store does. The objects as stored (encrypted): a replica reveals no more than
        the source store. A pack's id is its sha256, so packs are not read here (the push checks
        each one as it streams it); a first-release chunk object is read and hashed. An object
        missing from the source store fails with the version's name and the version stays
        unreplicated."""
        store, scope, label = copy.store, copy.manifest.source, f"version {copy.manifest.id}"
        refs = self._refs(copy)
        missing = missing_objects(store, scope, refs)
        if missing:
            raise IntegrityError(
                f"{label}: {missing[0]} is missing from the store (or of another size): "
                "not replicated"
            )
        files = []
        for key, size in sorted(refs.items()):
            pid = id_of_pack_key(key)
            if pid is None:
                files.append(_stored_file(store, key, scope, CHUNK_MEDIA_TYPE, label))
                continue
            files.append(
                ReplicaFile(
                    key.removeprefix(f"{scope}/"),
                    pid,
                    size,
                    PACK_MEDIA_TYPE,
                    key,
                    partial(store.open_read, key),
                )
            )
        refs_key = copy.manifest.source_metadata[REFS_KEY]
        files.append(_stored_file(store, refs_key, scope, REFS_MEDIA_TYPE, label))
        base = copy_version(store, copy.manifest)
        metadata = copy.manifest.source_metadata
        annotations = {
            **base.annotations,
            "dev.spark-backup.version-digest": str(metadata.get("version_digest") or ""),
            "dev.spark-backup.label": str(metadata.get("label") or ""),
        }
        return replace(base, files=(*files, *base.files), annotations=annotations)

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


def _stored_file(store: Any, key: str, scope: str, media_type: str, label: str) -> ReplicaFile:
    """A store object as a replica file named by its key below the source (unique in the
    version), with the sha256 and size of its bytes as stored."""
    try:
        with store.open_read(key) as raw:
            reader = HashingReader(raw)
            reader.drain()
    except NotFoundError:
        raise IntegrityError(f"{label}: {key} is missing from the store: not replicated") from None
    return ReplicaFile(
        key.removeprefix(f"{scope}/"),
        reader.hexdigest(),
        reader.bytes,
        media_type,
        key,
        partial(store.open_read, key),
    )


def _read_file(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while data := handle.read(1 << 20):
            yield data
