"""Reading a dump back: the deep verify of its tar stream, and restore into databases of a
server, each checked collection by collection against the counts and digests of the manifest.

A restore into a database goes into a database that does not exist yet (``--to-db NAME``, or a
mapping ``SRC=DST,...`` for a dump of several databases); a failed restore drops what it
created. It never writes into a database of the source's own dump on the source's own server
unless forced, and never into an existing database unless forced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from spark_backup.engine.manifest import Manifest
from spark_backup.engine.streams import Readable
from spark_backup.engine.tar_stream import TarFormatError, TarReader
from spark_backup.errors import IntegrityError, RestoreRefused, UsageError
from spark_backup.sources.mongodb.bsonfile import CollectionDigest, iter_documents
from spark_backup.sources.mongodb.dump import OPLOG_FILE, read_metadata_json, unescape_name

INSERT_BATCH = 1000
_BSON = ".bson"
_METADATA = ".metadata.json"


@dataclass
class DumpMember:
    """One file of a dump as the tar stream hands it over."""

    database: str
    collection: str  # "" for oplog.bson
    is_metadata: bool
    stream: Readable

    @property
    def namespace(self) -> str:
        return f"{self.database}.{self.collection}"


def dump_members(plain: Readable, label: str) -> Iterator[DumpMember]:
    """The files of a dump's tar stream, in archive order, each to be read before the next."""
    try:
        archive = TarReader(plain)
        for member in archive:
            if member.isdir():
                continue
            if not member.isreg():
                raise IntegrityError(f"{label}: unexpected member {member.name!r}")
            stream = archive.open(member)
            if member.name == OPLOG_FILE:
                yield DumpMember("", "", False, stream)
                continue
            database, slash, file_name = member.name.partition("/")
            if not slash or "/" in file_name:
                raise IntegrityError(f"{label}: {member.name!r} is not in mongodump's layout")
            if file_name.endswith(_METADATA):
                name = file_name.removesuffix(_METADATA)
                yield DumpMember(database, unescape_name(name), True, stream)
            elif file_name.endswith(_BSON):
                name = file_name.removesuffix(_BSON)
                yield DumpMember(database, unescape_name(name), False, stream)
            else:
                raise IntegrityError(f"{label}: {member.name!r} is not in mongodump's layout")
    except TarFormatError as exc:
        raise IntegrityError(f"{label}: not a readable tar stream: {exc}") from None


def compare_collections(
    manifest: Manifest, found: Mapping[str, CollectionDigest], renamed: Mapping[str, str] | None
) -> dict[str, int]:
    """Every collection the manifest records (those ``renamed`` names, if given), with its
    count and digest, in ``found`` by the namespace it was restored to; ``IntegrityError``
    naming the first that differs."""
    expected = manifest.source_metadata.get("collections", {})
    counts = {}
    for namespace, recorded in sorted(expected.items()):
        if recorded.get("type") != "collection":
            continue
        if renamed is not None and namespace not in renamed:
            continue
        target = renamed[namespace] if renamed is not None else namespace
        got = found.get(target, CollectionDigest())
        if got.documents != recorded["documents"] or got.digest != recorded["digest"]:
            raise IntegrityError(
                f"copy {manifest.id}: {target} holds {got.documents} documents with digest "
                f"{got.digest[:16]}...; the dump recorded {recorded['documents']} with "
                f"{recorded['digest'][:16]}..."
            )
        counts[target] = got.documents
    return counts


def check_dump_plaintext(plain: Readable, manifest: Manifest) -> None:
    """Deep verify: every BSON file parses to whole documents whose count and digest are the
    manifest's, and every metadata file is extended JSON."""
    label = f"copy {manifest.id}"
    found: dict[str, CollectionDigest] = {}
    for member in dump_members(plain, label):
        if member.is_metadata:
            read_metadata_json(member.stream.read(), f"{label}: {member.namespace}")
            continue
        digest = CollectionDigest()
        for raw in iter_documents(member.stream, f"{label}: {member.namespace or OPLOG_FILE}"):
            digest.add(raw)
        if member.collection:
            found[member.namespace] = digest
    compare_collections(manifest, found, None)


# --- into a database ----------------------------------------------------------------------------


def database_mapping(manifest: Manifest, value: str) -> dict[str, str]:
    """``NAME`` for a dump of one database, else ``SRC=DST[,SRC=DST]`` naming each."""
    databases: list[str] = manifest.source_metadata.get("databases", [])
    if "=" not in value:
        if len(databases) != 1:
            raise UsageError(
                f"copy {manifest.id} holds databases {', '.join(databases) or '(none)'}: map "
                "each with --to-db SRC=DST[,SRC=DST]"
            )
        mapping = {databases[0]: value}
    else:
        mapping = {}
        for pair in value.split(","):
            src, _, dst = pair.partition("=")
            if src not in databases:
                raise UsageError(
                    f"copy {manifest.id} holds no database {src!r} (it holds: "
                    f"{', '.join(databases)})"
                )
            mapping[src] = dst
    for dst in mapping.values():
        if not dst or any(c in dst for c in '/\\. "$') or len(dst) > 63:
            raise UsageError(f"{dst!r} is not a MongoDB database name")
    if len(set(mapping.values())) != len(mapping):
        raise UsageError("two databases of the copy map to the same target")
    return mapping


@dataclass
class DatabaseRestore:
    """Restores a dump's members into target databases, remembering what it created."""

    client: Any
    mapping: dict[str, str]
    label: str
    created: list[str] = field(default_factory=list)
    collections: int = 0
    documents: int = 0

    def check_targets(self, force: bool, protected: set[str]) -> None:
        existing = set(self.client.list_database_names())
        for src, dst in self.mapping.items():
            if dst in protected and not force:
                raise RestoreRefused(
                    f"database {dst!r} is one the source dumps on this server: restore under "
                    "another name, or pass --force to write into it"
                )
            if dst in existing and self.client[dst].list_collection_names() and not force:
                raise RestoreRefused(
                    f"database {dst!r} already exists; restore into a new name or pass --force "
                    f"(copy database {src!r})"
                )

    def restore(
        self, plain: Readable, replay_oplog: Callable[[Readable], None] | None = None
    ) -> None:
        """The dump's collections; its ``oplog.bson`` goes to ``replay_oplog`` (a point-in-time
        restore replays it), else is left out, as ``mongorestore`` without ``--oplogReplay``."""
        existing = set(self.client.list_database_names())
        pending_indexes: dict[str, list[dict[str, Any]]] = {}
        for member in dump_members(plain, self.label):
            if not member.collection:
                if replay_oplog is not None:
                    replay_oplog(member.stream)
                continue
            if member.database not in self.mapping:
                continue
            target = self.mapping[member.database]
            if target not in existing and target not in self.created:
                self.created.append(target)
            if member.is_metadata:
                metadata = read_metadata_json(member.stream.read(), f"{self.label}: metadata")
                self._create(target, member.collection, metadata)
                pending_indexes[f"{target}.{member.collection}"] = metadata.get("indexes", [])
            else:
                self._insert(target, member.collection, member.stream)
        for namespace, indexes in pending_indexes.items():
            database, _, collection = namespace.partition(".")
            specs = [spec for spec in indexes if spec.get("name") != "_id_"]
            if specs:
                self.client[database].command(
                    "createIndexes",
                    collection,
                    indexes=[{k: v for k, v in s.items() if k not in ("v", "ns")} for s in specs],
                )

    def _create(self, database: str, collection: str, metadata: dict[str, Any]) -> None:
        db = self.client[database]
        if collection in db.list_collection_names():
            db.drop_collection(collection)  # forced into an existing database
        # A view's options hold its definition (viewOn, pipeline): create makes either.
        db.command("create", collection, **dict(metadata.get("options", {})))
        if metadata.get("type") != "view":
            self.collections += 1

    def _insert(self, database: str, collection: str, stream: Readable) -> None:
        from bson import CodecOptions
        from bson.raw_bson import RawBSONDocument

        target = self.client[database].get_collection(
            collection, codec_options=CodecOptions(document_class=RawBSONDocument)
        )
        batch: list[RawBSONDocument] = []
        for raw in iter_documents(stream, f"{self.label}: {database}.{collection}"):
            batch.append(RawBSONDocument(raw))
            if len(batch) >= INSERT_BATCH:
                target.insert_many(batch, ordered=True, bypass_document_validation=True)
                self.documents += len(batch)
                batch = []
        if batch:
            target.insert_many(batch, ordered=True, bypass_document_validation=True)
            self.documents += len(batch)

    def digests(self) -> dict[str, CollectionDigest]:
        """Count and digest every collection of the target databases, read back as raw BSON."""
        return read_digests(self.client, list(self.mapping.values()))

    def drop_created(self) -> None:
        for database in self.created:
            self.client.drop_database(database)


def read_digests(client: Any, databases: list[str]) -> dict[str, CollectionDigest]:
    from bson import CodecOptions
    from bson.raw_bson import RawBSONDocument

    found: dict[str, CollectionDigest] = {}
    for database in databases:
        db = client[database]
        for info in db.list_collections():
            if info.get("type", "collection") != "collection":
                continue
            collection = db.get_collection(
                info["name"], codec_options=CodecOptions(document_class=RawBSONDocument)
            )
            digest = CollectionDigest()
            for document in collection.find({}):
                digest.add(document.raw)
            found[f"{database}.{info['name']}"] = digest
    return found


def renamed_namespaces(manifest: Manifest, mapping: Mapping[str, str]) -> dict[str, str]:
    renamed = {}
    for namespace in manifest.source_metadata.get("collections", {}):
        database, _, collection = namespace.partition(".")
        if database in mapping:
            renamed[namespace] = f"{mapping[database]}.{collection}"
    return renamed
