"""``dump_tool: mongodump``: the MongoDB Database Tools' ``mongodump`` writes the dump into a
private temporary folder, then the same tar stream as the pymongo reader is made of it, with
the same per-collection counts and digests (read from the files it wrote) and, for a full dump
of a replica set (``--oplog``), ``consistent_at`` from the last entry of its ``oplog.bson``.

The password reaches mongodump through a ``--config`` file (mode 0600, deleted with the
folder), never an argument or the environment. The folder holds the whole uncompressed dump
while it is packed: plan the temporary space (``TMPDIR``) for it.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from spark_backup.engine.processes import first_error, tool_environment
from spark_backup.engine.secrets import SecretResolver
from spark_backup.engine.streams import ChunkReader, Readable
from spark_backup.engine.tar_stream import TarWriter
from spark_backup.errors import SourceError
from spark_backup.sources.mongodb import oplog
from spark_backup.sources.mongodb.bsonfile import DIGEST_ALGORITHM, CollectionDigest, iter_documents
from spark_backup.sources.mongodb.dump import (
    DUMP_LAYERS,
    OPLOG_FILE,
    read_metadata_json,
    unescape_name,
)
from spark_backup.sources.mongodb.server import (
    KIND_NAME,
    connected,
    is_replica_set,
    list_namespaces,
    password_of,
)
from spark_backup.sources.mongodb.settings import MongoSource

_BSON = ".bson"
_METADATA = ".metadata.json"


def mongodump_path(source: MongoSource) -> str:
    found = shutil.which("mongodump")
    if not found:
        raise SourceError(
            f"source {source.name!r}: dump_tool is mongodump, but mongodump is not on the PATH "
            "(install the MongoDB Database Tools, or set dump_tool: pymongo)"
        )
    return found


def is_full_dump(source: MongoSource) -> bool:
    """mongodump's ``--oplog`` needs a dump of every database, with no namespace filter."""
    return (
        source.databases == "all"
        and not source.exclude_databases
        and not source.include_collections
        and not source.exclude_collections
    )


class MongodumpToolReader:
    kind = KIND_NAME
    layers = DUMP_LAYERS
    part = ""

    def __init__(self, source: MongoSource, secrets: SecretResolver | None = None):
        self.source = source
        self.secrets = secrets
        self._metadata: dict[str, Any] = {}
        self._version = "unknown"

    @contextmanager
    def open(self) -> Iterator[Readable]:
        source = self.source
        tool = mongodump_path(source)
        started = dt.datetime.now(dt.UTC)
        password = password_of(source, self.secrets)
        with connected(source, self.secrets) as client:
            replica_set = is_replica_set(client)
            namespaces = list_namespaces(client, source)
        with tempfile.TemporaryDirectory(prefix="spark-backup-mongodump-") as folder:
            out = Path(folder) / "dump"
            args = [tool, "--uri", source.uri, "--out", str(out), "--quiet"]
            use_oplog = replica_set and is_full_dump(source)
            if use_oplog:
                args.append("--oplog")
            else:
                args += [f"--nsInclude={ns.name}" for ns in namespaces]
            if password is not None:
                args += ["--config", str(_config_file(Path(folder), password))]
            result = subprocess.run(
                args, capture_output=True, text=True, env=tool_environment(), check=False
            )
            if result.returncode != 0:
                reason = first_error(result.stderr.splitlines(), result.returncode)
                raise SourceError(
                    f"source {source.name!r}: mongodump failed: "
                    f"{reason.replace(password, '***') if password else reason}"
                )
            self._version = _tool_version(tool)
            yield ChunkReader(self._archive(out, replica_set, use_oplog, started))

    def _archive(
        self, out: Path, replica_set: bool, use_oplog: bool, started: dt.datetime
    ) -> Iterator[bytes]:
        source = self.source
        tar = TarWriter()
        collections: dict[str, Any] = {}
        databases: list[str] = []
        for folder in sorted(p for p in out.iterdir() if p.is_dir()):
            database = folder.name
            if not source.wants_database(database):
                continue
            for metadata_path in sorted(folder.glob(f"*{_METADATA}")):
                collection = unescape_name(metadata_path.name.removesuffix(_METADATA))
                if not source.wants_collection(database, collection):
                    continue
                if database not in databases:
                    databases.append(database)
                    yield from tar.directory(database)
                metadata = metadata_path.read_bytes()
                described = read_metadata_json(metadata, f"mongodump {database}.{collection}")
                yield from _file(tar, f"{database}/{metadata_path.name}", metadata_path)
                bson_path = folder / (metadata_path.name.removesuffix(_METADATA) + _BSON)
                if described.get("type") == "view" or not bson_path.exists():
                    collections[f"{database}.{collection}"] = {"type": "view"}
                    continue
                digest = _digest(bson_path, f"{database}.{collection}")
                yield from _file(tar, f"{database}/{bson_path.name}", bson_path)
                collections[f"{database}.{collection}"] = {"type": "collection", **digest.summary()}
        consistent_at = oplog_start = None
        entries = 0
        oplog_path = out / OPLOG_FILE
        if use_oplog and oplog_path.exists():
            with open(oplog_path, "rb") as handle:
                for raw in iter_documents(handle, f"mongodump {OPLOG_FILE}"):
                    ts = oplog.ts_json(_decode_ts(raw))
                    oplog_start = oplog_start or ts
                    consistent_at = ts
                    entries += 1
            yield from _file(tar, OPLOG_FILE, oplog_path)
        yield from tar.end()
        warnings = []
        if not replica_set:
            warnings.append("standalone server: no oplog, no point-in-time consistency")
        elif not use_oplog:
            warnings.append(
                "mongodump --oplog needs a dump of every database: this filtered dump has no "
                "consistent point, and oplog slices cannot continue from it"
            )
        self._metadata = {
            "databases": databases,
            "collections": collections,
            "documents": sum(c.get("documents", 0) for c in collections.values()),
            "digest_algorithm": DIGEST_ALGORITHM,
            "dump_tool": "mongodump",
            "layout": "mongodump",
            "replica_set": replica_set,
            "oplog_start": oplog_start,
            "consistent_at": consistent_at,
            "oplog_entries": entries,
            "dump_started_at": started.isoformat(),
            "warnings": warnings,
        }

    def metadata(self) -> dict[str, Any]:
        return self._metadata

    def tool_versions(self) -> dict[str, str]:
        return {"mongodump": self._version}


def _config_file(folder: Path, password: str) -> Path:
    path = folder / "mongodump.yaml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        yaml.safe_dump({"password": password}, handle)
    return path


def _digest(path: Path, label: str) -> CollectionDigest:
    digest = CollectionDigest()
    with open(path, "rb") as handle:
        for raw in iter_documents(handle, f"mongodump {label}"):
            digest.add(raw)
    return digest


def _file(tar: TarWriter, name: str, path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        yield from tar.file(name, path.stat().st_size, handle)


def _decode_ts(raw: bytes) -> Any:
    from bson.raw_bson import RawBSONDocument

    return RawBSONDocument(raw)["ts"]


def _tool_version(tool: str) -> str:
    result = subprocess.run(
        [tool, "--version"], capture_output=True, text=True, env=tool_environment(), check=False
    )
    lines = result.stdout.strip().splitlines()
    return lines[0] if lines else "unknown"
