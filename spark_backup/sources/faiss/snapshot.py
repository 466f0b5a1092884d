"""The snapshot of a FAISS index and its sidecars, with the catalogue entry and the probe
answers for the manifest. With the source's ``chunk_key``, the files (the index, each sidecar
and ``spark-backup-probes.json``) go through the blob layer as a version (``FaissVersionReader``:
packs shared with earlier snapshots, the version document as the copy); without it, and in
every copy of the first release, as one tar stream side by side under their own names
(``FaissSnapshotReader``).

Consistency: every file is opened before anything is read, the index is loaded for the
catalogue and the probes from the descriptor the backup holds (``/proc/self/fd/N``), so an index
replaced by a rename meanwhile is still the one archived; a file written in place while the
backup reads it (its size or mtime changed) fails the copy, which is then never published.

Time: the inspection (FAISS's import, the load, the catalogue facts, the probe searches) runs in
a process of its own (``inspection.py``) while the files are chunked or streamed
(``inspecting``); the probe file is added once both are done. A file without a FAISS header
fails before anything is read, one FAISS rejects stops the reading as soon as it did. On the
blob layer the index is cut at its structure (``layout.py``).
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from spark_backup.engine.blobs.keys import derive_chunk_key, key_fingerprint
from spark_backup.engine.blobs.version import REFS_KEY, REFS_SHA256, new_version
from spark_backup.engine.streams import ChunkReader, HashingReader, Readable
from spark_backup.engine.tar_stream import TarWriter
from spark_backup.errors import SourceError
from spark_backup.sources.base import StoreAccess
from spark_backup.sources.faiss import index as faiss_index
from spark_backup.sources.faiss import inspection as inspection_worker
from spark_backup.sources.faiss.layout import index_regions
from spark_backup.sources.faiss.settings import PROBES_FILE, FaissSource

KIND_NAME = "faiss"
CATALOGUE = "catalogue"


@dataclass
class _File:
    role: str
    path: Path
    handle: BinaryIO
    stat: os.stat_result
    sha256: str = ""

    @property
    def name(self) -> str:
        return self.path.name

    def changed(self) -> bool:
        now = os.fstat(self.handle.fileno())
        return (now.st_size, now.st_mtime_ns) != (self.stat.st_size, self.stat.st_mtime_ns)


def open_files(source: FaissSource, paths: list[Path]) -> list[_File]:
    """Open every file of the snapshot (the caller closes them), or name the one that fails."""
    opened: list[_File] = []
    try:
        for role, path in zip(source.roles(), paths, strict=True):
            try:
                # Non-blocking: a FIFO in the plan's place must not hang the backup.
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                raise SourceError(
                    f"source {source.name!r}: cannot read {path}: {exc.strerror}"
                ) from None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise SourceError(f"source {source.name!r}: {path} is not a regular file")
            opened.append(_File(role, path, os.fdopen(fd, "rb"), st))
    except BaseException:
        for item in opened:
            item.handle.close()
        raise
    return opened


def fd_path(handle: BinaryIO) -> str:
    return f"/proc/self/fd/{handle.fileno()}"


@contextmanager
def inspecting(source: FaissSource, files: list[_File]) -> Iterator[Future]:
    """FAISS's inspection of the index (``inspection.py``: a process of its own, given the
    descriptor the backup holds) while the caller reads the files: its import, the load and the
    probe searches overlap the hashing, compression and encryption. A file without a FAISS
    header fails here, before anything is read. The future gives the facts, the probe answers
    and the probe file's bytes; leaving the block early stops the worker."""
    index_file = files[0]
    label = str(index_file.path)
    faiss_index.check_header(fd_path(index_file.handle), label)
    probes = source.probes
    request = {
        "label": label,
        "factory": source.factory,
        "queries": probes.queries,
        "k": probes.k,
        "seed": probes.seed,
        "nprobe": probes.nprobe,
        "ef_search": probes.ef_search,
    }
    worker = inspection_worker.start(index_file.handle.fileno(), request)
    pool = ThreadPoolExecutor(1, thread_name_prefix="faiss-inspect")
    try:
        yield pool.submit(_answer, worker, label)
    finally:
        if worker.poll() is None:
            worker.kill()  # left early: nothing needs its answer
        pool.shutdown(wait=True, cancel_futures=True)
        worker.wait()


def _answer(worker: subprocess.Popen, label: str) -> tuple[dict, dict, bytes, str]:
    found = inspection_worker.answer(worker, label)
    return found["facts"], found["answers"], found["probe_file"].encode(), found["faiss"]


class _UntilInspectionFails:
    """A file's reads that stop with the inspection's error once it failed: an index FAISS
    cannot read fails the backup at once, not after all its bytes were chunked."""

    def __init__(self, handle: BinaryIO, inspection: Future):
        self._handle = handle
        self._inspection = inspection

    def fileno(self) -> int:
        return self._handle.fileno()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._handle.seek(offset, whence)

    def _raise_if_failed(self) -> None:
        if self._inspection.done():
            self._inspection.result()  # raises the inspection's error, if any

    def readinto(self, buffer: Any) -> int:
        self._raise_if_failed()
        return self._handle.readinto(buffer)  # type: ignore[attr-defined]

    def read(self, size: int = -1) -> bytes:
        self._raise_if_failed()
        return self._handle.read(size)


def check_unchanged(source: FaissSource, files: list[_File]) -> None:
    for item in files:
        if item.changed():
            raise SourceError(
                f"source {source.name!r}: {item.path} changed during the backup "
                "(written in place); the copy was not kept"
            )


def catalogue_entry(
    source: FaissSource, files: list[_File], facts: dict, answers: dict
) -> dict[str, Any]:
    probes = source.probes
    return {
        **facts,
        "embedding_model": source.embedding_model.model_dump(),
        "files": [
            {"role": f.role, "name": f.name, "bytes": f.stat.st_size, "sha256": f.sha256}
            for f in files
        ],
        "bytes": sum(f.stat.st_size for f in files),
        "probes": {
            "file": PROBES_FILE,
            "queries": probes.queries,
            "k": probes.k,
            "seed": probes.seed,
            "nprobe": probes.nprobe,
            "ef_search": probes.ef_search,
            "results_sha256": faiss_index.results_digest(answers),
        },
    }


class FaissSnapshotReader:
    """The ``PlaintextSource`` of one faiss backup as a tar stream (a source without
    ``chunk_key``, and every copy of the first release)."""

    kind = KIND_NAME

    def __init__(self, source: FaissSource, paths: list[Path]):
        self.source = source
        self.paths = paths
        self.layers = ["tar"]
        self._catalogue: dict[str, Any] = {}
        self._files: list[_File] = []
        self._faiss_version = "unknown"  # the inspection's, once the copy was read

    @contextmanager
    def open(self) -> Iterator[Readable]:
        with ExitStack() as stack:
            files = open_files(self.source, self.paths)
            for item in files:
                stack.callback(item.handle.close)
            inspection = stack.enter_context(inspecting(self.source, files))
            yield ChunkReader(self._tar(files, inspection))
            facts, answers, _probe_bytes, self._faiss_version = inspection.result()
            check_unchanged(self.source, files)
            self._files = files
            self._catalogue = catalogue_entry(self.source, files, facts, answers)

    def _tar(self, files: list[_File], inspection: Future) -> Iterator[bytes]:
        writer = TarWriter()
        for item in files:
            hashing = HashingReader(_UntilInspectionFails(item.handle, inspection))
            try:
                yield from writer.file(item.name, item.stat.st_size, hashing)
            except OSError:
                raise SourceError(
                    f"source {self.source.name!r}: {item.path} shrank during the backup; "
                    "the copy was not kept"
                ) from None
            item.sha256 = hashing.hexdigest()
        _facts, _answers, probe_bytes, _version = inspection.result()
        yield from writer.file(PROBES_FILE, len(probe_bytes), ChunkReader([probe_bytes]))
        yield from writer.end()

    def metadata(self) -> dict[str, Any]:
        catalogue = self._catalogue
        return {
            CATALOGUE: catalogue,
            "files": len(catalogue.get("files", [])) + 1,
            "index": self.paths[0].name,
        }

    def tool_versions(self) -> dict[str, str]:
        return {"faiss": self._faiss_version}


class FaissVersionReader:
    """The ``PlaintextSource`` of one faiss backup on the blob layer (a source with
    ``chunk_key``): the index, its sidecars and the probe file chunked into the source's packs,
    the version document as the copy's plaintext. A re-trained IVF index that keeps most of its
    inverted lists shares their chunks with the previous version."""

    kind = KIND_NAME

    def __init__(self, source: FaissSource, paths: list[Path], access: StoreAccess, secret: str):
        self.source = source
        self.paths = paths
        self.access = access
        self.layers = ["json"]
        self.mac_key = derive_chunk_key(secret, source.name)
        self._metadata: dict[str, Any] = {}
        self._faiss_version = "unknown"  # the inspection's, once the copy was read

    @contextmanager
    def open(self) -> Iterator[Readable]:
        store, scope = self.access.store, self.source.name
        with ExitStack() as stack:
            files = open_files(self.source, self.paths)
            for item in files:
                stack.callback(item.handle.close)
            inspection = stack.enter_context(inspecting(self.source, files))
            builder = new_version(
                store, scope, self.mac_key, self.access.recipients, self.access.compression.level
            )
            writer = builder.writer
            with builder.writing():
                for item in files:
                    item.handle.seek(0)
                    reads = _UntilInspectionFails(item.handle, inspection)
                    structure = None
                    if item is files[0]:  # the index: cut at its arrays and lists
                        structure = index_regions(item.handle.fileno(), item.stat.st_size)
                    entry = builder.add_open_file(reads, item.name, str(item.path), structure)  # type: ignore[arg-type]
                    item.sha256 = entry["sha256"]
                facts, answers, probe_bytes, self._faiss_version = inspection.result()
                builder.add_bytes(PROBES_FILE, probe_bytes)
            check_unchanged(self.source, files)
            packs, refs_key, refs_sha = builder.commit_refs(store, scope)
            catalogue = catalogue_entry(self.source, files, facts, answers)
            document = builder.document(
                scope, self.paths[0].name, {"key_fingerprint": key_fingerprint(self.mac_key)}
            )
            self._metadata = {
                CATALOGUE: catalogue,
                "files": len(files) + 1,
                "index": self.paths[0].name,
                "version_digest": document["digest"],
                "chunks": len({c[0] for f in document["files"] for c in f["chunks"]}),
                "new_chunks": writer.new_chunks,
                "packs": len(packs),
                "new_packs": len(writer.new_packs),
                "added_bytes": writer.new_stored_bytes,
                REFS_KEY: refs_key,
                REFS_SHA256: refs_sha,
            }
            yield io.BytesIO(json.dumps(document, separators=(",", ":")).encode())

    def metadata(self) -> dict[str, Any]:
        return self._metadata

    def tool_versions(self) -> dict[str, str]:
        return {"faiss": self._faiss_version}
