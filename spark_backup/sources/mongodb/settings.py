"""The plan model of a ``mongodb`` source."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from spark_backup.engine.cadence import CADENCES
from spark_backup.engine.secrets import SecretReference, env_reference
from spark_backup.engine.settings import Duration, SettingsModel
from spark_backup.plan.source import CadenceName, SourceSettings

# Databases that hold the server's own state, never a dump's content.
SYSTEM_DATABASES = frozenset({"admin", "config", "local"})
LOG = logging.getLogger(__name__)
# How a plan names where the password is (never the password itself).
PASSWORD_HINT = "'password: env:NAME' or 'password: vault:MOUNT/PATH#FIELD'"


class MongoOplog(SettingsModel):
    """Oplog slices: what a replica set wrote since the last slice, one copy per slice."""

    enabled: bool = True
    # The slice interval; default: the longest sub-daily cadence within the source's RPO.
    cadence: CadenceName | None = None
    # Freshness of the slices; default: twice the slice interval.
    max_age: Duration | None = None


class MongoSource(SourceSettings):
    """A MongoDB deployment: daily dumps in mongodump's layout, oplog slices between them."""

    kind: Literal["mongodb"]
    # mongodb:// or mongodb+srv:// URI without a password (user name, hosts, replicaSet, tls...).
    uri: str
    # Where the password of the URI's user is: a reference (env:NAME or vault:MOUNT/PATH#FIELD),
    # never the password. The older password_env: NAME still reads as env:NAME (deprecated).
    password: SecretReference | None = None
    databases: list[str] | Literal["all"] = "all"
    exclude_databases: list[str] = Field(default=[])
    # Namespace globs ("shop.orders", "shop.*", "*.audit_*"); include empty: every collection.
    include_collections: list[str] = Field(default=[])
    exclude_collections: list[str] = Field(default=[])
    rpo: Duration = dt.timedelta(minutes=15)
    oplog: MongoOplog = MongoOplog.default_instance()
    # "mongodump": run the tool (same layout) where it is on the PATH; default: pymongo.
    dump_tool: Literal["pymongo", "mongodump"] = "pymongo"
    connect_timeout: Duration = dt.timedelta(seconds=10)

    @model_validator(mode="before")
    @classmethod
    def _refuse_inline_password(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            uri = data.get("uri")
            if isinstance(uri, str) and _uri_has_password(uri):
                raise ValueError(
                    f"uri must not contain a password; name where it is with {PASSWORD_HINT}"
                )
            if "password_env" in data:
                name = data.get("password_env")
                data = env_reference(dict(data), "password_env", "password")
                # One line, each time the plan is read, until the plan is rewritten.
                LOG.warning(
                    "source %r: password_env is deprecated; write 'password: env:%s' instead",
                    data.get("name", "?"),
                    name,
                )
        return data

    @field_validator("uri")
    @classmethod
    def _mongodb_uri(cls, value: str) -> str:
        if not value.startswith(("mongodb://", "mongodb+srv://")):
            raise ValueError("expected a mongodb:// or mongodb+srv:// URI")
        return value

    @field_validator("databases", mode="before")
    @classmethod
    def _database_names(cls, value: Any) -> Any:
        if value != "all" and (
            not isinstance(value, list)
            or not value
            or not all(isinstance(name, str) and name and "." not in name for name in value)
        ):
            raise ValueError("expected 'all' or a non-empty list of database names")
        return value

    @field_validator("include_collections", "exclude_collections")
    @classmethod
    def _namespace_globs(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if "." not in pattern:
                raise ValueError(f"expected DATABASE.COLLECTION globs, got {pattern!r}")
        return value

    @property
    def slice_cadence(self) -> str:
        """The oplog slice interval: the plan's, else the longest sub-daily cadence within the
        RPO (15 minutes at the least)."""
        if self.oplog.cadence:
            return self.oplog.cadence
        fitting = [c for c in CADENCES.values() if c.sub_daily and c.length <= self.rpo]
        return max(fitting, key=lambda c: c.length).name if fitting else "15min"

    def wants_database(self, database: str) -> bool:
        if database in SYSTEM_DATABASES or database in self.exclude_databases:
            return False
        return self.databases == "all" or database in self.databases

    def wants_collection(self, database: str, collection: str) -> bool:
        """Whether the namespace is dumped (``system.*`` collections never are: the server
        keeps its own state there; indexes and views travel in the metadata)."""
        namespace = f"{database}.{collection}"
        if collection.startswith("system.") or not self.wants_database(database):
            return False
        if self.include_collections and not any(
            fnmatchcase(namespace, p) for p in self.include_collections
        ):
            return False
        return not any(fnmatchcase(namespace, p) for p in self.exclude_collections)


def _uri_has_password(uri: str) -> bool:
    """``user:secret@`` in the authority part (never echoed)."""
    try:
        authority = urlsplit(uri).netloc
    except ValueError:
        return False
    userinfo, at, _hosts = authority.rpartition("@")
    return bool(at) and ":" in userinfo
