"""S3-compatible object storage: the offsite and WORM tier.

Objects are streamed with bounded memory: bytes are buffered up to one part and uploaded as a
multipart upload; an object smaller than one part goes in a single PutObject. Every request
carries a SHA-256 checksum of its body, so the server refuses bytes damaged on the way. A write
that fails (or is interrupted) aborts its multipart upload, leaving no parts behind; one that was
killed outright is what ``cleanup_incomplete`` aborts later.

Objects are create-only: a HEAD refuses an existing key up front and ``If-None-Match: *`` makes
the server refuse it atomically at publish time, where the server supports conditional writes.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    ProfileNotFound,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from spark_backup.engine.secrets import EnvSecrets, SecretResolver
from spark_backup.engine.stores.base import (
    ObjectInfo,
    ObjectLock,
    ObjectLockPolicy,
    ObjectStore,
    ObjectVersion,
    check_folder,
    check_key,
    original_version,
)
from spark_backup.engine.stores.config import S3StoreConfig
from spark_backup.engine.streams import Readable, Writable
from spark_backup.errors import NotFoundError, ObjectLockedError, StoreError

MIB = 1024 * 1024
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 120.0

_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchVersion"}
_CREDENTIALS_REJECTED = {
    "403",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
}


def make_client(
    store: str,
    *,
    endpoint_url: str | None,
    region_name: str | None,
    profile_name: str | None = None,
    max_attempts: int = 5,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
    use_ssl: bool = True,
    verify: bool | None = None,
    aws_access_key_id: str | None = None,
    aws_secret_access_key: str | None = None,
    aws_session_token: str | None = None,
) -> Any:
    """An S3 client as every store needs it: SigV4, path-style addressing (S3-compatible
    servers), bounded retries and timeouts. A profile may assume a role (``role_arn`` in the
    AWS config); explicit credentials take precedence over it, as boto3 decides."""
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    # A session of its own: boto3's default session is not safe to share between threads.
    try:
        session = boto3.session.Session(profile_name=profile_name)
    except ProfileNotFound:
        raise StoreError(
            f"store {store!r}: AWS profile {profile_name!r} is not in the AWS config"
        ) from None
    return session.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region_name,
        use_ssl=use_ssl,
        verify=verify,
        aws_access_key_id=aws_access_key_id,
        aws_secret_access_key=aws_secret_access_key,
        aws_session_token=aws_session_token,
        config=config,
    )


class S3Store(ObjectStore):
    def __init__(
        self,
        name: str,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        part_size: int = 16 * MIB,
        lock_policy: ObjectLockPolicy | None = None,
    ):
        self.name = name
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_size = part_size
        self._lock_policy = lock_policy
        # Cleared when the server answers NotImplemented to If-None-Match; the HEAD check remains.
        self.conditional_writes = True

    @classmethod
    def from_config(
        cls,
        cfg: S3StoreConfig,
        secrets: SecretResolver | None = None,
        *,
        client: Any = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
    ) -> S3Store:
        """The store ``cfg`` describes, with ``client`` (the Dagster layer's, from dagster-aws's
        session configuration) or else a client of its own made from ``cfg``, with the
        credentials its references name read through ``secrets``."""
        if client is None:
            secrets = secrets or SecretResolver({"env": EnvSecrets()})
            credentials: dict[str, str] = {}
            for parameter, ref in (
                ("aws_access_key_id", cfg.access_key_id),
                ("aws_secret_access_key", cfg.secret_access_key),
                ("aws_session_token", cfg.session_token),
            ):
                if ref is not None:
                    credentials[parameter] = secrets.resolve_for(f"store {cfg.name!r}", ref)
            client = make_client(
                cfg.name,
                endpoint_url=cfg.endpoint_url,
                region_name=cfg.region_name,
                profile_name=cfg.profile_name,
                max_attempts=cfg.max_attempts,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                **credentials,
            )
        lock_policy = (
            ObjectLockPolicy(cfg.object_lock.mode, cfg.object_lock.retain_days)
            if cfg.object_lock
            else None
        )
        return cls(
            cfg.name,
            client,
            cfg.bucket,
            cfg.prefix,
            part_size=cfg.part_size_mb * MIB,
            lock_policy=lock_policy,
        )

    # --- naming ---------------------------------------------------------------------------------

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def object_uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    @property
    def default_lock(self) -> ObjectLockPolicy | None:
        return self._lock_policy

    @property
    def multipart(self) -> bool:
        return True

    def upload_abort_days(self) -> int | None:
        try:
            config = self.client.get_bucket_lifecycle_configuration(Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) in ("NoSuchLifecycleConfiguration", "404", "NotFound"):
                return None
            raise self._failure(f"read the lifecycle rules of {self.bucket!r}", exc) from None
        except BotoCoreError as exc:
            raise self._failure(f"read the lifecycle rules of {self.bucket!r}", exc) from None
        found = []
        for rule in config.get("Rules", []):
            days = rule.get("AbortIncompleteMultipartUpload", {}).get("DaysAfterInitiation")
            if rule.get("Status") != "Enabled" or days is None:
                continue
            selector = rule.get("Filter", {})
            selector = selector.get("And", selector)
            if "Tag" in selector or "Tags" in selector:
                continue  # S3 refuses tag filters with this action; a server may not
            prefix = rule.get("Prefix") or selector.get("Prefix") or ""
            if self._root().startswith(prefix):
                found.append(int(days))
        return min(found, default=None)

    @property
    def versioned(self) -> bool:
        # Object Lock needs a versioned bucket; other buckets are not asked for their history.
        return self._lock_policy is not None

    @property
    def endpoint(self) -> str:
        return self.client.meta.endpoint_url

    def _root(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def _full(self, key: str) -> str:
        return self._root() + check_key(key)

    # --- errors ---------------------------------------------------------------------------------

    def _failure(self, doing: str, exc: Exception) -> StoreError:
        """One line for an operator: the store, what failed, and the server's code and message.
        Neither botocore's messages nor the server's carry credential values."""
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = error.get("Code") or str(status)
            detail = f"{code}: {error.get('Message') or f'HTTP {status}'}"
        elif isinstance(exc, BotoConnectionError):
            detail = f"cannot reach endpoint {self.endpoint} ({type(exc).__name__})"
        elif isinstance(exc, HTTPClientError):
            detail = f"connection to endpoint {self.endpoint} failed ({type(exc).__name__})"
        elif isinstance(exc, NoCredentialsError):
            detail = "no credentials found (name them with access_key_id/secret_access_key)"
        else:
            detail = f"{type(exc).__name__}: {exc}"
        return StoreError(" ".join(f"store {self.name!r}: cannot {doing}: {detail}".split()))

    def _call(self, doing: str, operation: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return operation(Bucket=self.bucket, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._failure(doing, exc) from None

    # --- store operations -----------------------------------------------------------------------

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = _code(exc)
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StoreError(
                    f"store {self.name!r}: bucket {self.bucket!r} does not exist at {self.endpoint}"
                ) from None
            if code in _CREDENTIALS_REJECTED:
                raise StoreError(
                    f"store {self.name!r}: credentials rejected by {self.endpoint} for bucket "
                    f"{self.bucket!r} ({code})"
                ) from None
            raise self._failure(f"use bucket {self.bucket!r}", exc) from None
        except BotoCoreError as exc:
            raise self._failure(f"use bucket {self.bucket!r}", exc) from None
        if self._lock_policy is None:
            return
        try:
            config = self.client.get_object_lock_configuration(Bucket=self.bucket)
            enabled = config.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
        except ClientError as exc:
            if _code(exc) != "ObjectLockConfigurationNotFoundError":
                raise self._failure(
                    f"read the Object Lock setting of {self.bucket!r}", exc
                ) from None
            enabled = None
        except BotoCoreError as exc:
            raise self._failure(f"read the Object Lock setting of {self.bucket!r}", exc) from None
        if enabled != "Enabled":
            raise StoreError(
                f"store {self.name!r}: bucket {self.bucket!r} has no Object Lock configuration, "
                f"but the store is set to write {self._lock_policy.mode} locked copies"
            )

    @contextmanager
    def open_write(self, key: str, *, lock: ObjectLock | None = None) -> Iterator[Writable]:
        full = self._full(key)
        if self._head(full, f"write {key}") is not None:
            raise StoreError(f"store {self.name!r}: object {key} already exists")
        writer = _S3Writer(self, key, full, lock)
        try:
            yield writer
            writer.finish()
        except BaseException:
            # Also on KeyboardInterrupt and GeneratorExit: no parts may stay behind.
            writer.abort()
            raise

    @contextmanager
    def open_read(self, key: str, version_id: str | None = None) -> Iterator[Readable]:
        full = self._full(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=full, **_version(version_id))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise NotFoundError(f"store {self.name!r}: object {key} not found") from None
            raise self._failure(f"read {key}", exc) from None
        except BotoCoreError as exc:
            raise self._failure(f"read {key}", exc) from None
        body = response["Body"]
        try:
            yield _BodyReader(self, key, body)
        finally:
            body.close()

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        root = self._root()
        found = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=root + prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    found.append(
                        ObjectInfo(
                            item["Key"][len(root) :],
                            item["Size"],
                            item["LastModified"].astimezone(dt.UTC),
                        )
                    )
        except (ClientError, BotoCoreError) as exc:
            raise self._failure(f"list {root + prefix or '/'}", exc) from None
        yield from sorted(found, key=lambda info: info.key)

    def list_folders(self, prefix: str = "") -> list[str]:
        parent = self._root() + check_folder(prefix)
        found = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=parent, Delimiter="/"
            )
            for page in pages:
                for common in page.get("CommonPrefixes", []):
                    found.append(common["Prefix"][len(parent) :].rstrip("/"))
        except (ClientError, BotoCoreError) as exc:
            raise self._failure(f"list {parent or '/'}", exc) from None
        return sorted(found)

    def exists(self, key: str) -> bool:
        return self._head(self._full(key), f"read {key}") is not None

    def lock_of(self, key: str, version_id: str | None = None) -> ObjectLock | None:
        full = self._full(key)
        if version_id is None and self.versioned:
            # The version spark-backup wrote, not whatever was stacked on it (or hides it).
            original = original_version(self.versions(key).get(key, []))
            version_id = original.version_id if original else None
            if original is None:
                raise NotFoundError(f"store {self.name!r}: object {key} not found")
        head = self._head(full, f"read {key}", version_id)
        if head is None:
            raise NotFoundError(f"store {self.name!r}: object {key} not found")
        return _lock_from(head)

    def versions(self, prefix: str) -> dict[str, list[ObjectVersion]]:
        root = self._root()
        found: dict[str, list[ObjectVersion]] = {}
        try:
            pages = self.client.get_paginator("list_object_versions").paginate(
                Bucket=self.bucket, Prefix=root + prefix
            )
            for page in pages:
                # S3 lists each key's data versions newest first, and its markers apart.
                for entry, marker in [(e, False) for e in page.get("Versions", [])] + [
                    (e, True) for e in page.get("DeleteMarkers", [])
                ]:
                    found.setdefault(entry["Key"][len(root) :], []).append(
                        ObjectVersion(
                            entry["Key"][len(root) :],
                            entry["VersionId"],
                            bool(entry.get("IsLatest")),
                            marker,
                            int(entry.get("Size", 0)),
                            entry["LastModified"].astimezone(dt.UTC),
                        )
                    )
        except (ClientError, BotoCoreError) as exc:
            raise self._failure(f"list the versions below {root + prefix or '/'}", exc) from None
        # The latest entry first, then data versions in S3's order (newest first), then markers.
        return {
            key: sorted(history, key=lambda v: (not v.latest, v.delete_marker))
            for key, history in sorted(found.items())
        }

    def delete(self, key: str) -> None:
        full = self._full(key)
        head = self._head(full, f"delete {key}")
        lock = _lock_from(head) if head is not None else None
        if lock is not None and lock.active():
            raise self._locked(key, lock)
        # Object Lock buckets are versioned: a plain DELETE only adds a delete marker and keeps the
        # bytes, so every version of the key is deleted (the only one, "null", when unversioned).
        for version_id in self._versions(key, full):
            try:
                self.client.delete_object(Bucket=self.bucket, Key=full, VersionId=version_id)
            except ClientError as exc:
                # Servers refuse a locked version with differing codes (AWS: AccessDenied), so the
                # version's own retention tells a lock from any other refusal.
                version_lock = self._version_lock(full, version_id)
                if version_lock is not None and version_lock.active():
                    raise self._locked(key, version_lock) from None
                raise self._failure(f"delete {key}", exc) from None
            except BotoCoreError as exc:
                raise self._failure(f"delete {key}", exc) from None

    def cleanup_incomplete(
        self,
        older_than: dt.timedelta,
        owned: Callable[[str], bool],
        *,
        apply: bool = True,
        now: dt.datetime | None = None,
    ) -> list[str]:
        cutoff = (now or dt.datetime.now(dt.UTC)) - older_than
        root = self._root()
        removed = []
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=root
            )
            for page in pages:
                for upload in page.get("Uploads", []):
                    key = upload["Key"][len(root) :]
                    if not owned(key) or self._upload_progress(upload) >= cutoff:
                        continue
                    if apply:
                        self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                    removed.append(key)
        except (ClientError, BotoCoreError) as exc:
            raise self._failure("clean up incomplete uploads", exc) from None
        return removed

    def _upload_progress(self, upload: dict[str, Any]) -> dt.datetime:
        """When an upload last made progress: its newest part, else its start. A long backup
        still uploading parts is not stale however long ago it started."""
        newest = upload["Initiated"]
        pages = self.client.get_paginator("list_parts").paginate(
            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
        )
        for page in pages:
            for part in page.get("Parts", []):
                newest = max(newest, part["LastModified"])
        return newest.astimezone(dt.UTC)

    # --- helpers --------------------------------------------------------------------------------

    def _head(self, full: str, doing: str, version_id: str | None = None) -> dict[str, Any] | None:
        """The object's metadata (of one version), or None if it does not exist."""
        try:
            return self.client.head_object(Bucket=self.bucket, Key=full, **_version(version_id))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise self._failure(doing, exc) from None
        except BotoCoreError as exc:
            raise self._failure(doing, exc) from None

    def _version_lock(self, full: str, version_id: str) -> ObjectLock | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=full, VersionId=version_id)
        except (ClientError, BotoCoreError):
            return None  # a delete marker, or a version already gone, holds no retention
        return _lock_from(head)

    def _versions(self, key: str, full: str) -> list[str]:
        """Version ids of exactly ``full``, data versions and delete markers alike."""
        found = []
        try:
            pages = self.client.get_paginator("list_object_versions").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                for entry in page.get("Versions", []) + page.get("DeleteMarkers", []):
                    if entry["Key"] == full:
                        found.append(entry["VersionId"])
        except (ClientError, BotoCoreError) as exc:
            raise self._failure(f"list the versions of {key}", exc) from None
        return found

    def _locked(self, key: str, lock: ObjectLock) -> ObjectLockedError:
        return ObjectLockedError(
            f"store {self.name!r}: object {key} is under {lock.mode} retention until "
            f"{lock.retain_until.isoformat()}"
        )


class _S3Writer:
    """Buffers one part at a time; the first full part turns the write into a multipart upload."""

    def __init__(self, store: S3Store, key: str, full: str, lock: ObjectLock | None):
        self._store = store
        self._key = key
        self._full = full
        self._lock_args: dict[str, Any] = (
            {"ObjectLockMode": lock.mode, "ObjectLockRetainUntilDate": lock.retain_until}
            if lock
            else {}
        )
        self._buffer = bytearray()
        # Set when published, on a versioned bucket: the version the manifest records.
        self.version_id: str | None = None
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        while view:
            room = self._store.part_size - len(self._buffer)
            self._buffer += view[:room]
            view = view[room:]
            if len(self._buffer) >= self._store.part_size:
                self._upload_part()
        return size

    def flush(self) -> None:
        """Parts go out when full; a flush cannot publish anything early."""

    def _upload_part(self) -> None:
        store = self._store
        doing = f"write {self._key}"
        if self._upload_id is None:
            created = store._call(
                doing,
                store.client.create_multipart_upload,
                Key=self._full,
                ChecksumAlgorithm="SHA256",
                **self._lock_args,
            )
            self._upload_id = created["UploadId"]
        body = bytes(self._buffer)
        checksum = sha256_b64(body)
        number = len(self._parts) + 1
        part = store._call(
            doing,
            store.client.upload_part,
            Key=self._full,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=body,
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=checksum,
        )
        self._parts.append({"PartNumber": number, "ETag": part["ETag"], "ChecksumSHA256": checksum})
        self._buffer.clear()

    def finish(self) -> None:
        store = self._store
        if self._upload_id is None:
            body = bytes(self._buffer)
            self._publish(
                store.client.put_object,
                Key=self._full,
                Body=body,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=sha256_b64(body),
                **self._lock_args,
            )
            return
        if self._buffer:
            self._upload_part()
        self._publish(
            store.client.complete_multipart_upload,
            Key=self._full,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": self._parts},
        )
        self._upload_id = None

    def _publish(self, operation: Callable[..., Any], **kwargs: Any) -> None:
        """The request that makes the object visible, refused by the server if the key exists."""
        store = self._store
        if store.conditional_writes:
            try:
                response = operation(Bucket=store.bucket, IfNoneMatch="*", **kwargs)
                self.version_id = _published_version(response)
                return
            except ClientError as exc:
                code = _code(exc)
                if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise StoreError(
                        f"store {store.name!r}: object {self._key} already exists"
                    ) from None
                if code != "NotImplemented":
                    raise store._failure(f"write {self._key}", exc) from None
                store.conditional_writes = False
            except BotoCoreError as exc:
                raise store._failure(f"write {self._key}", exc) from None
        response = store._call(f"write {self._key}", operation, **kwargs)
        self.version_id = _published_version(response)

    def abort(self) -> None:
        if self._upload_id is None:
            return
        upload_id, self._upload_id = self._upload_id, None
        # The original failure is what the caller needs to see; an upload left behind here (the
        # endpoint went away) is what cleanup_incomplete removes later.
        with suppress(ClientError, BotoCoreError):
            self._store.client.abort_multipart_upload(
                Bucket=self._store.bucket, Key=self._full, UploadId=upload_id
            )


class _BodyReader:
    """The response body, read in the caller's chunks, with transport errors as StoreError."""

    def __init__(self, store: S3Store, key: str, body: Any):
        self._store = store
        self._key = key
        self._body = body

    def read(self, size: int = -1) -> bytes:
        try:
            return self._body.read(None if size < 0 else size)
        except BotoCoreError as exc:
            raise self._store._failure(f"read {self._key}", exc) from None

    def readable(self) -> bool:
        return True


def sha256_b64(data: bytes) -> str:
    """The ``ChecksumSHA256`` of a request body: base64 of its SHA-256 digest."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def _code(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(error.get("Code") or status)


def _published_version(response: dict[str, Any]) -> str | None:
    """The version a write made; an unversioned bucket has none (some servers say "null")."""
    version = response.get("VersionId")
    return version if version and version != "null" else None


def _version(version_id: str | None) -> dict[str, str]:
    return {"VersionId": version_id} if version_id else {}


def _lock_from(head: dict[str, Any]) -> ObjectLock | None:
    mode = head.get("ObjectLockMode")
    until = head.get("ObjectLockRetainUntilDate")
    if not mode or until is None:
        return None
    return ObjectLock(mode, until.astimezone(dt.UTC))
