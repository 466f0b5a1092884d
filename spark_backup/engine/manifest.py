"""The manifest: one JSON document per copy, written after the data, which makes the copy exist.

Layout in a store (see docs/architecture.md)::

    <source>/data/<copy id>.<format>      the encrypted bytes, written first
    <source>/manifests/<copy id>.json     this manifest, written last: the commit

A copy id is ``<source>-<UTC start, YYYYMMDDTHHMMSS.mmmZ>-<8 hex>``: it sorts by start time
within a source (to the millisecond, so ``ls | sort`` finds the newest) and names its source, so ``restore ID`` finds the manifest without a listing. The manifest
holds public facts only (checksums, sizes, public keys, tool versions), never key material, so
it is stored in clear JSON for anyone to read.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
import secrets
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from spark_backup.errors import IntegrityError, NotFoundError

if TYPE_CHECKING:
    from pydantic import TypeAdapter

MANIFEST_FORMAT = "spark-backup.manifest/v1"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# A source's name as the plan allows it; every key starts with one.
SOURCE_NAME = r"[a-z][a-z0-9_]{0,62}"
# A copy id is its source's name, then this: the start time (UTC, milliseconds) and 8 random hex.
ID_AFTER_SOURCE = r"-\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{8}"
COPY_ID_RE = re.compile(rf"^(?P<source>{SOURCE_NAME}){ID_AFTER_SOURCE}$")


def utc_stamp(when: dt.datetime) -> str:
    """``YYYYMMDDTHHMMSS.mmmZ``: a UTC time in a key, sorting as the time does."""
    utc = when.astimezone(dt.UTC)
    return f"{utc:%Y%m%dT%H%M%S}.{utc.microsecond // 1000:03d}Z"


def new_copy_id(source: str, started_at: dt.datetime) -> str:
    return f"{source}-{utc_stamp(started_at)}-{secrets.token_hex(4)}"


def source_of(copy_id: str) -> str:
    match = COPY_ID_RE.match(copy_id)
    if not match:
        raise NotFoundError(
            f"{copy_id!r} is not a copy id (expected SOURCE-YYYYMMDDTHHMMSS.mmmZ-XXXXXXXX, "
            "as `spark-backup list` shows)"
        )
    return match["source"]


def data_key(source: str, copy_id: str, suffix: str) -> str:
    return f"{source}/data/{copy_id}.{suffix}"


def data_prefix(source: str) -> str:
    return f"{source}/data/"


def manifest_key(source: str, copy_id: str) -> str:
    return f"{source}/manifests/{copy_id}.json"


def manifest_prefix(source: str | None = None) -> str:
    return f"{source}/manifests/" if source else ""


# (?P=source): a copy's id names the source whose folder holds it.
_MANIFEST_KEY_RE = re.compile(
    rf"^(?P<source>{SOURCE_NAME})/manifests/(?P<id>(?P=source){ID_AFTER_SOURCE})\.json$"
)
# The suffix names the layers, innermost first, as the pipeline writes it (``.tar.zst.age``).
_DATA_KEY_RE = re.compile(
    rf"^(?P<source>{SOURCE_NAME})/data/(?P<id>(?P=source){ID_AFTER_SOURCE})"
    r"\.(?:[a-z0-9]+\.)*zst\.age$"
)


def is_manifest_key(key: str) -> bool:
    """A key spark-backup writes manifests under (other objects in the store are not ours)."""
    return copy_id_of_manifest_key(key) is not None


def copy_id_of_manifest_key(key: str) -> str | None:
    match = _MANIFEST_KEY_RE.match(key)
    return match["id"] if match else None


def is_copy_key(key: str) -> bool:
    """A key spark-backup writes, data or manifest; prune never touches any other object."""
    return copy_id_of_data_key(key) is not None or is_manifest_key(key)


def copy_id_of_data_key(key: str) -> str | None:
    match = _DATA_KEY_RE.match(key)
    return match["id"] if match else None


@dataclass(frozen=True)
class Digest:
    """The sha256 and size of one layer of a copy (its plaintext, or its stored bytes)."""

    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """A committed copy: what it holds, where it is stored, how it was made and its digests."""

    id: str
    source: str
    kind: str
    partition: str
    store: str
    data_key: str
    # Layers from the outside in, e.g. ["age", "zstd", "tar"]: open the copy by undoing each.
    layers: list[str]
    started_at: str
    finished_at: str
    plaintext: Digest
    stored: Digest
    compression: dict[str, Any]
    encryption: dict[str, Any]
    tools: dict[str, str]
    host: str
    source_metadata: dict[str, Any] = field(default_factory=dict)
    lock: dict[str, str] | None = None
    # Which of a run's streams this copy holds, for kinds that write several per run (a
    # PostgreSQL dump writes "globals" and one "database:NAME" per database); "" otherwise.
    # Retention and checks treat each part as its own series.
    part: str = ""
    # The S3 VersionId of the data object on a versioned (Object Lock) bucket: reads name it, so
    # a version or delete marker stacked on it later changes nothing; None elsewhere.
    data_version: str | None = None
    format: str = MANIFEST_FORMAT
    # Ed25519 over everything else (engine/signing.py); None in manifests of release 0.1.0
    # and of plans without signing.
    signature: dict[str, str] | None = None

    @property
    def started(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.started_at)

    @property
    def finished(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.finished_at)

    @property
    def duration_seconds(self) -> float:
        return (self.finished - self.started).total_seconds()

    @property
    def compression_ratio(self) -> float:
        return self.plaintext.bytes / self.stored.bytes if self.stored.bytes else 0.0

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes, origin: str) -> Manifest:
        """Parse and check a stored manifest; ``IntegrityError`` names what is wrong."""
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IntegrityError(f"{origin}: manifest is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise IntegrityError(
                f"{origin}: unsupported manifest format {found!r} (expected {MANIFEST_FORMAT})"
            )
        from pydantic import ValidationError

        try:
            manifest = _adapter().validate_json(raw, strict=True)
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            field_path = ".".join(str(part) for part in error["loc"])
            raise IntegrityError(f"{origin}: manifest field {field_path}: {error['msg']}") from None
        return manifest.checked(origin)

    def checked(self, origin: str) -> Manifest:
        """This manifest if its fields agree with each other, else ``IntegrityError``; what a
        type check alone cannot see."""
        manifest = self
        try:
            manifest.started, manifest.finished  # noqa: B018 - both must parse
        except ValueError:
            raise IntegrityError(f"{origin}: manifest times are not ISO 8601") from None
        if (
            copy_id_of_data_key(manifest.data_key) != manifest.id
            or source_of(manifest.id) != manifest.source
        ):
            raise IntegrityError(
                f"{origin}: manifest data_key does not belong to copy {manifest.id}"
            )
        for digest in (manifest.plaintext, manifest.stored):
            if digest.bytes < 0 or not _SHA256_RE.match(digest.sha256):
                raise IntegrityError(f"{origin}: manifest digests are malformed")
        recipients = manifest.encryption.get("recipients")
        if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
            raise IntegrityError(f"{origin}: manifest encryption.recipients is not a list of keys")
        return manifest


@functools.cache
def _adapter() -> TypeAdapter[Manifest]:
    """Built on first use: pydantic and the schema cost a command that reads no manifest."""
    from pydantic import TypeAdapter

    return TypeAdapter(Manifest)
