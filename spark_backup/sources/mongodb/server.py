"""Connections to a MongoDB deployment, with the password read from where the plan's reference
names it (``env:`` or ``vault:``, through the plan's secret resolver), and the one place
pymongo's errors become spark-backup's (by type, never by message text)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from spark_backup.engine.secrets import EnvSecrets, SecretResolver
from spark_backup.errors import SourceError
from spark_backup.sources.mongodb.settings import MongoSource

KIND_NAME = "mongodb"
# MongoDB's code for a failed authentication (a wrong password or user).
AUTHENTICATION_FAILED = 18


@dataclass(frozen=True)
class Namespace:
    database: str
    collection: str
    # "collection" or "view" (a view travels as metadata only, as mongodump writes it).
    type: str
    options: dict[str, Any]
    uuid: str | None

    @property
    def name(self) -> str:
        return f"{self.database}.{self.collection}"


def password_of(source: MongoSource, secrets: SecretResolver | None = None) -> str | None:
    """The password the source's reference names (``SecretError`` in one line naming the
    source and the reference if it cannot be read); None without a reference."""
    if source.password is None:
        return None
    resolver = secrets or SecretResolver({"env": EnvSecrets()})
    return resolver.resolve_for(f"source {source.name!r}", source.password)


def client_for(source: MongoSource, password: str | None, **options: Any):
    """A client for the source's URI; the password is handed to pymongo only, never put in
    the URI or any message."""
    import pymongo

    timeout_ms = int(source.connect_timeout.total_seconds() * 1000)
    return pymongo.MongoClient(
        source.uri,
        password=password,
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
        appname="spark-backup",
        **options,
    )


@contextmanager
def connected(
    source: MongoSource, secrets: SecretResolver | None = None, **options: Any
) -> Iterator[Any]:
    """A connected client, its password read through ``secrets`` (the plan's resolver; by
    default, environment variables only); pymongo's failures come out as one-line
    ``SourceError``s."""
    from pymongo.errors import (
        ConfigurationError,
        ConnectionFailure,
        InvalidURI,
        OperationFailure,
        PyMongoError,
    )

    where = f"source {source.name!r} ({_hosts(source.uri)})"
    password = password_of(source, secrets)
    try:
        client = client_for(source, password, **options)
    except (InvalidURI, ConfigurationError) as exc:
        raise SourceError(f"{where}: the uri is not usable: {_scrub(exc, password)}") from None
    try:
        yield client
    except OperationFailure as exc:
        if exc.code == AUTHENTICATION_FAILED:
            # The reference says where to look; the value is never shown.
            hint = f"check {source.password}" if source.password else "the plan names no password"
            raise SourceError(
                f"{where}: authentication failed for the URI's user ({hint})"
            ) from None
        raise SourceError(f"{where}: the server refused: {_scrub(exc, password)}") from None
    except ConnectionFailure as exc:
        raise SourceError(f"{where}: cannot reach the server: {_scrub(exc, password)}") from None
    except PyMongoError as exc:
        raise SourceError(f"{where}: {_scrub(exc, password)}") from None
    finally:
        client.close()


def list_namespaces(client: Any, source: MongoSource) -> list[Namespace]:
    """The collections and views the plan asks for, in name order."""
    found = []
    for database in sorted(client.list_database_names()):
        if not source.wants_database(database):
            continue
        for info in client[database].list_collections():
            name = info["name"]
            kind = info.get("type", "collection")
            if kind not in ("collection", "view") or not source.wants_collection(database, name):
                continue
            uuid = info.get("info", {}).get("uuid")
            found.append(
                Namespace(
                    database,
                    name,
                    kind,
                    dict(info.get("options", {})),
                    None if uuid is None else _uuid_hex(uuid),
                )
            )
    if source.databases != "all":
        present = {ns.database for ns in found}
        missing = [db for db in source.databases if db not in present]
        if missing:
            raise SourceError(
                f"source {source.name!r}: database {missing[0]!r} has no collection to dump "
                "on the server (or does not exist)"
            )
    return sorted(found, key=lambda ns: (ns.database, ns.collection))


def collection_uuid(client: Any, database: str, collection: str) -> str | bool | None:
    """The collection's uuid now; False if it no longer exists."""
    # Filtered here, not by the server: not every server honours listCollections' filter.
    for info in client[database].list_collections():
        if info["name"] == collection:
            uuid = info.get("info", {}).get("uuid")
            return None if uuid is None else _uuid_hex(uuid)
    return False


def is_replica_set(client: Any) -> bool:
    return "setName" in client.admin.command("hello")


def _uuid_hex(value: Any) -> str:
    import uuid as uuid_module

    from bson.binary import Binary

    if isinstance(value, uuid_module.UUID):
        return value.hex
    if isinstance(value, Binary):
        return value.as_uuid().hex
    return str(value).replace("-", "")


def _hosts(uri: str) -> str:
    """The URI's hosts without user or options, for messages."""
    authority = uri.split("://", 1)[-1].split("/", 1)[0]
    return authority.rpartition("@")[2]


def _scrub(exc: BaseException, password: str | None) -> str:
    """pymongo's message on one line, without the password should it ever appear in it."""
    # A server selection timeout appends the whole topology: the reason comes before it.
    text = " ".join(str(exc).split()).split(", Topology Description:")[0]
    if password:
        text = text.replace(password, "***")
    return text[:300]
