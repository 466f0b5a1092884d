"""Drill records: the proof, stored beside a copy, that it was restored and how long that took.

Layout in a store, next to the copy (see ``manifest.py``)::

    <source>/drills/<copy id>.<UTC drill time, YYYYMMDDTHHMMSS.mmmZ>.json

Objects are create-only, so every drill of a copy adds a record and the newest one is the
copy's drill status. A record holds public facts only (times, pass or fail, what the semantic
check counted); a copy with no record was never drilled. Records are clear JSON, like manifests.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from spark_backup.engine.manifest import ID_AFTER_SOURCE, SOURCE_NAME
from spark_backup.engine.stores.base import ObjectStore
from spark_backup.errors import IntegrityError, NotFoundError

DRILL_FORMAT = "spark-backup.drill/v1"
_DRILL_KEY_RE = re.compile(
    rf"^(?P<source>{SOURCE_NAME})/drills/(?P<id>(?P=source){ID_AFTER_SOURCE})"
    r"\.(?P<stamp>\d{8}T\d{6}\.\d{3}Z)\.json$"
)


def drill_prefix(source: str) -> str:
    return f"{source}/drills/"


def drill_key(source: str, copy_id: str, drilled_at: dt.datetime) -> str:
    at = drilled_at.astimezone(dt.UTC)
    return f"{drill_prefix(source)}{copy_id}.{at:%Y%m%dT%H%M%S}.{at.microsecond // 1000:03d}Z.json"


def copy_id_of_drill_key(key: str) -> str | None:
    match = _DRILL_KEY_RE.match(key)
    return match["id"] if match else None


@dataclass(frozen=True)
class DrillRecord:
    """One copy restored into staging, checked and torn down."""

    copy_id: str
    source: str
    partition: str
    part: str
    drilled_at: str
    passed: bool
    # The restore of this copy into staging with its semantic check, in seconds.
    restore_seconds: float
    # The whole drill this copy was part of (every part of the partition), against the RTO.
    drill_seconds: float
    rto_seconds: float
    within_rto: bool
    check: str
    description: str
    metrics: dict[str, Any] = field(default_factory=dict)
    format: str = DRILL_FORMAT

    @property
    def drilled(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.drilled_at)

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes, origin: str) -> DrillRecord:
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IntegrityError(f"{origin}: drill record is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != DRILL_FORMAT:
            raise IntegrityError(f"{origin}: not a drill record (expected {DRILL_FORMAT})")
        try:
            return _adapter().validate_python(data, strict=False)
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            field_path = ".".join(str(part) for part in error["loc"])
            raise IntegrityError(
                f"{origin}: drill record field {field_path}: {error['msg']}"
            ) from None


@functools.cache
def _adapter() -> TypeAdapter[DrillRecord]:
    """Built on first use: listing copies that were never drilled reads no record."""
    return TypeAdapter(DrillRecord)


def write_drill_record(store: ObjectStore, record: DrillRecord) -> str:
    """Store the record beside its copy, under the store's Object Lock like the copy; return
    its key."""
    key = drill_key(record.source, record.copy_id, record.drilled)
    lock = store.default_lock.lock_from(record.drilled) if store.default_lock else None
    store.put_bytes(key, record.to_json(), lock=lock)
    return key


def latest_drills(store: ObjectStore, source: str) -> dict[str, DrillRecord]:
    """The newest readable drill record of each copy of ``source`` in ``store``, by copy id.
    Keys sort by drill time within a copy, so only the newest is read (an unreadable one is
    skipped for the one before it: it must not hide the copy)."""
    keys: dict[str, list[str]] = {}
    for info in store.list(drill_prefix(source)):
        copy_id = copy_id_of_drill_key(info.key)
        if copy_id is not None:
            keys.setdefault(copy_id, []).append(info.key)
    newest: dict[str, DrillRecord] = {}
    for copy_id, found in keys.items():
        for key in sorted(found, reverse=True):
            try:
                record = DrillRecord.from_json(store.get_bytes(key), store.object_uri(key))
            except (IntegrityError, NotFoundError):
                continue
            newest[copy_id] = record
            break
    return newest


def verified_copies(store: ObjectStore, source: str) -> set[str]:
    """Ids of the copies of ``source`` whose newest drill passed: retention keeps the newest."""
    return {copy_id for copy_id, record in latest_drills(store, source).items() if record.passed}


def drill_keys_of(store: ObjectStore, source: str, copy_id: str) -> list[str]:
    """Every drill record of one copy (prune removes them with the copy)."""
    return [
        info.key
        for info in store.list(f"{drill_prefix(source)}{copy_id}.")
        if copy_id_of_drill_key(info.key) == copy_id
    ]
