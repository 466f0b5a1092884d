"""Replica records: whether a version is replicated to a target, stored beside the copy in the
source's own store, create-only like every object::

    <source>/replicas/<target>/<version>.<UTC time, YYYYMMDDTHHMMSS.mmmZ>.json

The newest record of a (version, target) is its state. ``replicated: false`` (the target was
down, refused the push, or holds other digests) means the next replication run pushes the
version again; nothing is ever deleted to get there, neither the copy nor the replica. Records
hold public facts only (digests, where, why not), like manifests.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from spark_backup.engine.manifest import SOURCE_NAME, utc_stamp
from spark_backup.engine.stores.base import ObjectStore
from spark_backup.errors import IntegrityError, NotFoundError

REPLICA_FORMAT = "spark-backup.replica/v1"
_TARGET = r"[a-z][a-z0-9_]{0,62}"
_KEY_RE = re.compile(
    rf"^(?P<source>{SOURCE_NAME})/replicas/(?P<target>{_TARGET})/"
    r"(?P<version>[A-Za-z0-9_.-]+?)\.(?P<stamp>\d{8}T\d{6}\.\d{3}Z)\.json$"
)


def replica_prefix(source: str, target: str | None = None) -> str:
    return f"{source}/replicas/" + (f"{target}/" if target else "")


def record_key(source: str, target: str, version: str, at: dt.datetime) -> str:
    return f"{replica_prefix(source, target)}{version}.{utc_stamp(at)}.json"


@dataclass(frozen=True)
class ReplicaRecord:
    """Whether one version is replicated to one target, as last pushed or checked."""

    source: str
    version: str
    partition: str
    target: str
    target_kind: str
    recorded_at: str
    replicated: bool
    # Where the replica is (an OCI reference with its manifest digest, a store URI).
    location: str
    # File name -> OCI digest, as the target holds them (what was found, on a failed check).
    digests: dict[str, str] = field(default_factory=dict)
    problem: str | None = None
    format: str = REPLICA_FORMAT

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes, origin: str) -> ReplicaRecord:
        try:
            data: Any = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IntegrityError(f"{origin}: replica record is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != REPLICA_FORMAT:
            raise IntegrityError(f"{origin}: not a replica record (expected {REPLICA_FORMAT})")
        try:
            return cls(**data)
        except TypeError as exc:
            raise IntegrityError(f"{origin}: replica record: {exc}") from None


def write_record(store: ObjectStore, record: ReplicaRecord) -> str:
    """Store the record beside the copy, under the store's Object Lock like it."""
    at = dt.datetime.fromisoformat(record.recorded_at)
    key = record_key(record.source, record.target, record.version, at)
    lock = store.default_lock.lock_from(at) if store.default_lock else None
    store.put_bytes(key, record.to_json(), lock=lock)
    return key


def newest_records(store: ObjectStore, source: str, target: str) -> dict[str, ReplicaRecord]:
    """The newest readable record of each version of ``source`` on ``target``."""
    keys: dict[str, list[str]] = {}
    for info in store.list(replica_prefix(source, target)):
        match = _KEY_RE.match(info.key)
        if match and match["source"] == source and match["target"] == target:
            keys.setdefault(match["version"], []).append(info.key)
    newest: dict[str, ReplicaRecord] = {}
    for version, found in keys.items():
        for key in sorted(found, reverse=True):
            try:
                newest[version] = ReplicaRecord.from_json(
                    store.get_bytes(key), store.object_uri(key)
                )
            except (IntegrityError, NotFoundError):
                continue
            break
    return newest


def record_keys_of(store: ObjectStore, source: str, version: str) -> list[str]:
    """Every replica record of one version, on every target (prune removes them with the
    copy; the replicas themselves stay)."""
    found = []
    for info in store.list(replica_prefix(source)):
        match = _KEY_RE.match(info.key)
        if match and match["version"] == version:
            found.append(info.key)
    return found
