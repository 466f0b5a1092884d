"""The ``faiss`` kind: a FAISS index with its sidecars (id mapping, document store), as a
version on the blob layer (a source with ``chunk_key``: ``BlobVersions`` serves its packs) or as
one tar stream (without it, and every copy of the first release), a catalogue entry in the
manifest, and probe queries that a restore must answer exactly as the original index did.

FAISS (``faiss-cpu``) is imported only when an index is read: planning, listing and restoring
by hand need none of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from pyrage import x25519

from spark_backup.engine.blobs.version import parse_version
from spark_backup.engine.manifest import Manifest
from spark_backup.engine.staging import remove_tree
from spark_backup.engine.streams import CHUNK_SIZE, Readable
from spark_backup.engine.tar_stream import TarFormatError, TarReader
from spark_backup.errors import IntegrityError, SourceError, UsageError
from spark_backup.sources.base import (
    Artifact,
    Catalogued,
    CopyRef,
    FolderRestore,
    Observable,
    Observation,
    Runtime,
    SemanticCheck,
    SemanticResult,
    SourceContext,
    SourceKind,
    restore_tar_copy,
)
from spark_backup.sources.blob_versions import BlobVersions, restore_version
from spark_backup.sources.faiss import index as faiss_index
from spark_backup.sources.faiss.inspection import PROBES_FORMAT
from spark_backup.sources.faiss.settings import PROBES_FILE, FaissSource
from spark_backup.sources.faiss.snapshot import (
    CATALOGUE,
    KIND_NAME,
    FaissSnapshotReader,
    FaissVersionReader,
    fd_path,
    open_files,
)

SNAPSHOT = "snapshot"


class FaissKind(SourceKind[FaissSource], Observable, SemanticCheck, Catalogued, BlobVersions):
    name = KIND_NAME
    settings = FaissSource
    labels = frozenset({"faiss"})
    semantic_check_name = "probe_queries"

    def artifacts(self, source: FaissSource, context: SourceContext) -> list[Artifact]:
        model = source.embedding_model
        return [
            Artifact(
                SNAPSHOT,
                source.cadence,
                context.max_age,
                primary=True,
                description=(
                    f"{source.cadence} snapshots of the FAISS index {source.index} "
                    f"({model.name} {model.version}) and its sidecars"
                ),
            )
        ]

    def artifact_of(self, manifest: Manifest) -> str:
        return SNAPSHOT

    def readers(
        self, source: FaissSource, context: SourceContext, artifact: str = SNAPSHOT
    ) -> list[FaissSnapshotReader | FaissVersionReader]:
        if artifact != SNAPSHOT:
            raise UsageError(f"source {source.name!r} has no artifact {artifact!r} ({SNAPSHOT})")
        paths = [context.resolve(p) for p in source.files()]
        if source.chunk_key is None:
            return [FaissSnapshotReader(source, paths)]
        if context.store_access is None:
            raise SourceError(f"source {source.name!r}: a backup needs the source's store")
        secret = context.secrets.resolve_for(f"source {source.name!r} chunk_key", source.chunk_key)
        if len(secret.encode()) < 16:
            raise SourceError(f"source {source.name!r}: chunk_key must be at least 16 bytes")
        return [FaissVersionReader(source, paths, context.store_access(), secret)]

    def is_version(self, manifest: Manifest) -> bool:
        """A blob-layer version; a tar stream (no chunk_key, or the first release) is not."""
        return "tar" not in manifest.layers

    def probe(self, source: FaissSource, context: SourceContext) -> None:
        """Open every file and read the index's header and facts, as a backup would."""
        files = open_files(source, [context.resolve(p) for p in source.files()])
        try:
            loaded = faiss_index.read_index(fd_path(files[0].handle), str(files[0].path))
            faiss_index.describe(loaded, source.factory)
        finally:
            for item in files:
                item.handle.close()

    def restore_to_folder(
        self,
        copy: CopyRef,
        identities: list[x25519.Identity],
        target: Path,
        options: FolderRestore,
    ) -> dict[str, Any]:
        """The index and its sidecars under their own names, and the probe file, into
        ``target`` (published only after the copy's digests matched)."""
        if self.is_version(copy.manifest):
            return restore_version(copy, identities, target, options)
        return restore_tar_copy(copy, identities, target, options)

    def check_plaintext(self, plain: Readable, manifest: Manifest) -> None:
        """Every file the catalogue lists, with its size and sha256, and the probe file."""
        recorded = {f["name"]: f for f in catalogue_of(manifest).get("files", [])}
        found: dict[str, tuple[int, str]] = {}
        if self.is_version(manifest):
            document = parse_version(plain.read(), f"copy {manifest.id}")
            found = {f["path"]: (f["size"], f["sha256"]) for f in document["files"]}
        else:
            found = _tar_members(plain, manifest)
        for name, entry in recorded.items():
            if found.get(name) != (entry["bytes"], entry["sha256"]):
                state = "missing" if name not in found else "differs from the catalogue"
                raise IntegrityError(f"copy {manifest.id}: {name} {state}")
        if PROBES_FILE not in found:
            raise IntegrityError(f"copy {manifest.id}: {PROBES_FILE} missing")

    def observe(self, source: FaissSource, context: SourceContext) -> Observation:
        """Names, sizes and mtimes of the index and its sidecars."""
        digest = hashlib.sha256()
        total = 0
        for path in (context.resolve(p) for p in source.files()):
            try:
                st = os.stat(path)
            except OSError as exc:
                raise SourceError(f"source {source.name!r}: {path}: {exc.strerror}") from None
            total += st.st_size
            digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return Observation(digest.hexdigest()[:16], {"files": len(source.files()), "bytes": total})

    def catalogue(self, manifest: Manifest) -> dict[str, Any] | None:
        return catalogue_of(manifest) or None

    def semantic_check(
        self,
        runtime: Runtime,
        copy: CopyRef,
        identities: list[x25519.Identity],
        scratch: Path,
    ) -> SemanticResult:
        """Restore into ``scratch``, load the index and run the probe queries stored at backup:
        verified only when every id and distance is identical, and the index's facts match the
        catalogue."""
        target = scratch / "index"
        try:
            self.restore_to_folder(copy, identities, target, FolderRestore())
            return probe_restored(copy.manifest, target)
        finally:
            remove_tree(target)


def catalogue_of(manifest: Manifest) -> dict[str, Any]:
    return manifest.source_metadata.get(CATALOGUE) or {}


def probe_restored(manifest: Manifest, folder: Path) -> SemanticResult:
    """Whether the index restored into ``folder`` answers the stored probes identically."""
    catalogue = catalogue_of(manifest)
    index_name = catalogue["files"][0]["name"]
    path = folder / index_name
    probes_path = folder / PROBES_FILE
    for needed in (path, probes_path):
        if not stat.S_ISREG(os.lstat(needed).st_mode):
            return SemanticResult(False, f"{needed.name} is not a regular file in the restore")
    with open(probes_path, "rb") as handle:
        stored = json.load(handle)
    if stored.get("format") != PROBES_FORMAT:
        return SemanticResult(False, f"{PROBES_FILE}: unknown format {stored.get('format')!r}")
    recorded = catalogue["probes"]["results_sha256"]
    if faiss_index.results_digest(stored) != recorded:
        return SemanticResult(
            False, f"{PROBES_FILE} differs from the answers the manifest recorded"
        )
    loaded = faiss_index.read_index(path)
    facts = faiss_index.describe(loaded, catalogue.get("factory"))
    differing = [
        name
        for name in ("dimension", "ntotal", "metric", "index_type", "is_trained")
        if facts[name] != catalogue.get(name)
    ]
    metrics = {"ntotal": facts["ntotal"], "dimension": facts["dimension"]}
    if differing:
        return SemanticResult(
            False,
            f"restored {index_name}: {', '.join(differing)} differ from the catalogue",
            metrics,
        )
    answers = faiss_index.run_probes(
        loaded,
        stored["queries"],
        stored["k"],
        stored.get("nprobe"),
        stored.get("ef_search"),
        path,
    )
    problems = faiss_index.compare(stored, answers)
    metrics |= {"queries": len(stored["queries"]), "k": stored["k"], "differing": len(problems)}
    if problems:
        return SemanticResult(
            False,
            f"restored {index_name} answers {len(problems)} of {len(stored['queries'])} probe "
            f"queries differently: {problems[0]}",
            metrics,
        )
    return SemanticResult(
        True,
        f"restored {index_name} ({facts['ntotal']} vectors, d={facts['dimension']}) answered "
        f"{len(stored['queries'])} probe queries (top {stored['k']}) identically",
        metrics,
    )


def _tar_members(plain: Readable, manifest: Manifest) -> dict[str, tuple[int, str]]:
    """Size and sha256 of every member of a tar-stream copy."""
    found: dict[str, tuple[int, str]] = {}
    try:
        reader = TarReader(plain)
        for member in reader:
            if not member.isreg():
                raise IntegrityError(f"copy {manifest.id}: unexpected member {member.name}")
            digest, size, data = hashlib.sha256(), 0, reader.open(member)
            while chunk := data.read(CHUNK_SIZE):
                digest.update(chunk)
                size += len(chunk)
            found[member.name] = (size, digest.hexdigest())
    except TarFormatError as exc:
        raise IntegrityError(f"copy {manifest.id}: not a readable tar archive: {exc}") from None
    return found
