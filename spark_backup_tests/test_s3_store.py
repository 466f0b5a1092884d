"""S3Store against a real S3 server (SeaweedFS ``weed mini`` with authentication on).

Where a test claims the server enforced something, it shows the server's own answer (its HTTP
status and error code, recorded from botocore's ``after-call`` event), not just our exception.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
from typing import Any

import pytest
from botocore import UNSIGNED
from botocore.exceptions import ClientError

from spark_backup.engine.manifest import is_copy_key
from spark_backup.engine.stores import s3
from spark_backup.engine.stores.base import ObjectLock
from spark_backup.engine.stores.config import S3StoreConfig
from spark_backup.engine.stores.s3 import MIB, S3Store
from spark_backup.errors import NotFoundError, ObjectLockedError, SecretError, StoreError
from spark_backup_tests.helpers import free_port
from spark_backup_tests.seaweedfs import SeaweedFS

KEY_ENV = "SB_TEST_S3_ACCESS_KEY_ID"
SECRET_ENV = "SB_TEST_S3_SECRET_ACCESS_KEY"
PREFIX = "spark/copies"


@pytest.fixture
def make_store(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(KEY_ENV, seaweedfs.access_key)
    monkeypatch.setenv(SECRET_ENV, seaweedfs.secret_key)

    def make(bucket: str, **fields: Any) -> S3Store:
        values: dict[str, Any] = {
            "name": "offsite",
            "kind": "s3",
            "bucket": bucket,
            "prefix": PREFIX,
            "endpoint_url": seaweedfs.endpoint_url,
            "region_name": seaweedfs.region,
            "access_key_id_env": KEY_ENV,
            "secret_access_key_env": SECRET_ENV,
            "part_size_mb": 5,
            "max_attempts": 1,
        }
        values.update(fields)
        return S3Store.from_config(S3StoreConfig(**values))

    return make


class Wire:
    """What a store's client sent (operation, checksum header, body size) and what the server
    answered (operation, HTTP status, error code)."""

    def __init__(self, store: S3Store):
        self.sent: list[tuple[str, str | None, int]] = []
        self.xml: dict[str, bytes] = {}
        self.answers: list[tuple[str, int, str | None]] = []
        events = store.client.meta.events
        events.register("before-send.s3", self._before_send)
        events.register("after-call.s3", self._after_call)

    def _before_send(self, request, event_name: str, **_: Any) -> None:
        operation = event_name.rsplit(".", 1)[-1]
        if isinstance(request.body, bytes) and request.body.startswith(b"<"):
            self.xml[operation] = request.body
        checksum = request.headers.get("x-amz-checksum-sha256")
        self.sent.append(
            (
                operation,
                checksum.decode() if isinstance(checksum, bytes) else checksum,
                int(request.headers.get("Content-Length", -1)),
            )
        )

    def _after_call(self, http_response, parsed, model, **_: Any) -> None:
        code = parsed.get("Error", {}).get("Code")
        self.answers.append((model.name, http_response.status_code, code))

    def operations(self) -> list[str]:
        return [operation for operation, _status, _code in self.answers]


def payload(size: int) -> bytes:
    return os.urandom(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_in_chunks(store: S3Store, key: str, data: bytes, chunk: int = MIB + 7, **kw) -> None:
    with store.open_write(key, **kw) as writer:
        for start in range(0, len(data), chunk):
            writer.write(data[start : start + chunk])


def read_in_chunks(store: S3Store, key: str) -> bytes:
    digest = bytearray()
    with store.open_read(key) as reader:
        while chunk := reader.read(MIB):
            digest += chunk
    return bytes(digest)


def uploads(seaweedfs: SeaweedFS, bucket: str) -> list[dict]:
    return seaweedfs.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def versions(seaweedfs: SeaweedFS, bucket: str, key: str) -> list[dict]:
    listing = seaweedfs.client().list_object_versions(Bucket=bucket, Prefix=key)
    return [
        entry
        for entry in listing.get("Versions", []) + listing.get("DeleteMarkers", [])
        if entry["Key"] == key
    ]


# --- round trips ---------------------------------------------------------------------------------


def test_small_object_is_one_checksummed_put(make_store, s3_bucket, seaweedfs):
    store = make_store(s3_bucket)
    wire = Wire(store)
    data = payload(300_000)

    write_in_chunks(store, "daily/db.tar.zst", data, chunk=65_536)

    assert sha256(read_in_chunks(store, "daily/db.tar.zst")) == sha256(data)
    put = [entry for entry in wire.sent if entry[0] == "PutObject"]
    assert put == [("PutObject", s3.sha256_b64(data), len(data))]
    assert "CreateMultipartUpload" not in wire.operations()
    head = seaweedfs.client().head_object(
        Bucket=s3_bucket, Key=f"{PREFIX}/daily/db.tar.zst", ChecksumMode="ENABLED"
    )
    assert head["ChecksumSHA256"] == s3.sha256_b64(data)
    assert store.uri == f"s3://{s3_bucket}/{PREFIX}"
    assert store.object_uri("daily/db.tar.zst") == f"s3://{s3_bucket}/{PREFIX}/daily/db.tar.zst"


@pytest.mark.parametrize("chunk", [MIB + 7, 13 * MIB], ids=["small-writes", "one-write"])
def test_large_object_streams_as_checksummed_parts(make_store, s3_bucket, seaweedfs, chunk):
    store = make_store(s3_bucket)
    wire = Wire(store)
    data = payload(12 * MIB + 12345)

    write_in_chunks(store, "big.bin", data, chunk=chunk)

    assert wire.operations() == [
        "HeadObject",
        "CreateMultipartUpload",
        "UploadPart",
        "UploadPart",
        "UploadPart",
        "CompleteMultipartUpload",
    ]
    assert sha256(read_in_chunks(store, "big.bin")) == sha256(data)
    parts = [entry for entry in wire.sent if entry[0] == "UploadPart"]
    sizes = [5 * MIB, 5 * MIB, 2 * MIB + 12345]
    offsets = [0, 5 * MIB, 10 * MIB]
    checksums = [
        s3.sha256_b64(data[offset : offset + size])
        for offset, size in zip(offsets, sizes, strict=True)
    ]
    assert parts == [
        ("UploadPart", checksum, size) for checksum, size in zip(checksums, sizes, strict=True)
    ]
    completion = wire.xml["CompleteMultipartUpload"].decode()
    assert all(
        f"<ChecksumSHA256>{checksum}</ChecksumSHA256>" in completion for checksum in checksums
    )
    head = seaweedfs.client().head_object(
        Bucket=s3_bucket, Key=f"{PREFIX}/big.bin", ChecksumMode="ENABLED"
    )
    # The server combined the three part checksums it verified into a composite one.
    assert head["ChecksumSHA256"].endswith("-3")
    assert head["ContentLength"] == len(data)
    assert uploads(seaweedfs, s3_bucket) == []


def test_empty_object_round_trip(make_store, s3_bucket):
    store = make_store(s3_bucket)
    with store.open_write("empty"):
        pass
    assert store.get_bytes("empty") == b""


def test_list_exists_and_missing_objects(make_store, s3_bucket, seaweedfs):
    store = make_store(s3_bucket)
    for key in ("b/2", "a/1", "b/1"):
        store.put_bytes(key, key.encode())
    seaweedfs.client().put_object(Bucket=s3_bucket, Key="outside/prefix", Body=b"x")

    listed = list(store.list())
    assert [info.key for info in listed] == ["a/1", "b/1", "b/2"]
    assert all(info.size == 3 and info.modified.tzinfo == dt.UTC for info in listed)
    assert [info.key for info in store.list("b/")] == ["b/1", "b/2"]
    assert store.exists("a/1") and not store.exists("a/2")
    with pytest.raises(NotFoundError, match="object a/2 not found"):
        store.get_bytes("a/2")
    with pytest.raises(NotFoundError):
        store.lock_of("a/2")
    assert store.lock_of("a/1") is None


# --- create-only and all-or-nothing ---------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 7 * MIB], ids=["put", "multipart"])
def test_objects_are_create_only(make_store, s3_bucket, seaweedfs, size):
    store = make_store(s3_bucket)
    original = payload(size)
    store.put_bytes("copy", original)

    with pytest.raises(StoreError, match=r"^store 'offsite': object copy already exists$"):
        store.put_bytes("copy", payload(size))
    assert store.get_bytes("copy") == original


@pytest.mark.parametrize("size", [1000, 7 * MIB], ids=["put", "multipart"])
def test_server_refuses_overwrite_when_head_check_is_raced(
    make_store, s3_bucket, seaweedfs, monkeypatch, size
):
    """Another writer can publish the key between our HEAD and our publish: If-None-Match makes
    the server refuse it then."""
    store = make_store(s3_bucket)
    original = payload(size)
    store.put_bytes("copy", original)
    wire = Wire(store)
    monkeypatch.setattr(store, "_head", lambda full, doing: None)

    with pytest.raises(StoreError, match="object copy already exists"):
        store.put_bytes("copy", payload(size))

    publish = "PutObject" if size < store.part_size else "CompleteMultipartUpload"
    assert (publish, 412, "PreconditionFailed") in wire.answers
    assert store.get_bytes("copy") == original
    assert uploads(seaweedfs, s3_bucket) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_inside_block_leaves_no_object_and_no_parts(
    make_store, s3_bucket, seaweedfs, error
):
    store = make_store(s3_bucket)
    wire = Wire(store)

    with pytest.raises(error), store.open_write("partial") as writer:
        writer.write(payload(7 * MIB))
        assert uploads(seaweedfs, s3_bucket), "a part should be on the server by now"
        raise error("interrupted")

    assert "UploadPart" in wire.operations()
    assert ("AbortMultipartUpload", 204, None) in wire.answers
    assert not store.exists("partial")
    assert uploads(seaweedfs, s3_bucket) == []


@pytest.mark.parametrize(
    ("size", "refused_by"),
    [(1000, "PutObject"), (7 * MIB, "UploadPart")],
    ids=["put", "multipart"],
)
def test_server_rejects_bytes_that_do_not_match_their_checksum(
    make_store, s3_bucket, seaweedfs, monkeypatch, size, refused_by
):
    """The checksum is computed over bytes that differ from the body sent, as if the body had
    been damaged on the way: the server, not our code, notices."""
    store = make_store(s3_bucket)
    wire = Wire(store)
    honest = s3.sha256_b64

    def checksum_of_other_bytes(data: bytes) -> str:
        return honest(bytes([data[0] ^ 0xFF]) + data[1:])

    monkeypatch.setattr(s3, "sha256_b64", checksum_of_other_bytes)

    with pytest.raises(StoreError) as refused:
        write_in_chunks(store, "damaged", payload(size))

    message = str(refused.value)
    assert message.startswith("store 'offsite': cannot write damaged: BadDigest: ")
    assert "\n" not in message
    assert (refused_by, 400, "BadDigest") in wire.answers
    assert not store.exists("damaged")
    assert uploads(seaweedfs, s3_bucket) == []


def test_write_falls_back_when_server_lacks_conditional_writes(make_store, s3_bucket, seaweedfs):
    """Servers without If-None-Match answer NotImplemented; the write goes on, guarded by HEAD."""
    store = make_store(s3_bucket)
    real_put = store.client.put_object

    def put_without_conditions(**kwargs: Any) -> dict:
        if "IfNoneMatch" in kwargs:
            raise ClientError(
                {"Error": {"Code": "NotImplemented", "Message": "not here"}}, "PutObject"
            )
        return real_put(**kwargs)

    store.client.put_object = put_without_conditions

    store.put_bytes("plain", b"data")

    assert store.conditional_writes is False
    assert store.get_bytes("plain") == b"data"


# --- credentials and reachability --------------------------------------------------------------


def test_wrong_secret_is_rejected_by_the_server(make_store, s3_bucket, seaweedfs, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "not-the-secret")
    store = make_store(s3_bucket)

    with pytest.raises(StoreError, match="credentials rejected") as on_check:
        store.check()
    with pytest.raises(StoreError, match=r"^store 'offsite': cannot write x: 403") as on_write:
        store.put_bytes("x", b"data")
    monkeypatch.setattr(store, "_head", lambda full, doing: None)
    with pytest.raises(StoreError, match="SignatureDoesNotMatch") as on_put:
        store.put_bytes("x", b"data")

    anonymous = seaweedfs.client(signature_version=UNSIGNED)
    with pytest.raises(ClientError, match="AccessDenied"):
        anonymous.put_object(Bucket=s3_bucket, Key=f"{PREFIX}/x", Body=b"data")
    for error in (on_check, on_write, on_put):
        message = str(error.value)
        assert "\n" not in message
        assert seaweedfs.secret_key not in message and seaweedfs.access_key not in message
    assert seaweedfs.client().list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0


def test_missing_credential_variable_is_named(make_store, s3_bucket, monkeypatch):
    monkeypatch.delenv(SECRET_ENV)
    with pytest.raises(SecretError) as missing:
        make_store(s3_bucket)
    assert str(missing.value) == (
        f"store 'offsite': env:{SECRET_ENV}: environment variable {SECRET_ENV} is not set"
    )


def test_check_reports_missing_bucket_and_missing_object_lock(make_store, s3_bucket):
    make_store(s3_bucket).check()
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        make_store("no-such-bucket").check()
    locked = make_store(s3_bucket, object_lock={"mode": "COMPLIANCE", "retain_days": 30})
    with pytest.raises(StoreError, match="has no Object Lock configuration"):
        locked.check()


def test_unreachable_endpoint_fails_fast_naming_it(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "id")
    monkeypatch.setenv(SECRET_ENV, "secret")
    endpoint = f"http://127.0.0.1:{free_port()}"
    config = S3StoreConfig(
        name="offsite",
        kind="s3",
        bucket="backups",
        endpoint_url=endpoint,
        region_name="us-east-1",
        access_key_id_env=KEY_ENV,
        secret_access_key_env=SECRET_ENV,
        max_attempts=1,
    )
    store = S3Store.from_config(config, connect_timeout=1, read_timeout=1)

    started = time.monotonic()
    with pytest.raises(StoreError) as unreachable:
        store.check()
    assert time.monotonic() - started < 5
    assert str(unreachable.value) == (
        f"store 'offsite': cannot use bucket 'backups': cannot reach endpoint {endpoint} "
        "(EndpointConnectionError)"
    )
    with pytest.raises(StoreError, match=f"cannot write x: cannot reach endpoint {endpoint}"):
        store.put_bytes("x", b"data")


# --- Object Lock and delete ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 7 * MIB], ids=["put", "multipart"])
def test_compliance_lock_survives_every_delete(make_store, s3_lock_bucket, seaweedfs, size):
    store = make_store(s3_lock_bucket, object_lock={"mode": "COMPLIANCE", "retain_days": 1})
    store.check()
    lock = store.default_lock.lock_from(dt.datetime.now(dt.UTC))
    data = payload(size)
    store.put_bytes("worm", data, lock=lock)

    reported = store.lock_of("worm")
    assert reported.mode == "COMPLIANCE"
    assert abs(reported.retain_until - lock.retain_until) < dt.timedelta(seconds=1)
    assert reported.active()

    with pytest.raises(ObjectLockedError, match="under COMPLIANCE retention until 20"):
        store.delete("worm")
    full = f"{PREFIX}/worm"
    (version,) = versions(seaweedfs, s3_lock_bucket, full)
    client = seaweedfs.client()
    for bypass in (False, True):
        with pytest.raises(ClientError) as refused:
            client.delete_object(
                Bucket=s3_lock_bucket,
                Key=full,
                VersionId=version["VersionId"],
                BypassGovernanceRetention=bypass,
            )
        assert refused.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(ClientError, match="AccessDenied"):
        client.put_object_retention(
            Bucket=s3_lock_bucket,
            Key=full,
            VersionId=version["VersionId"],
            Retention={"Mode": "GOVERNANCE", "RetainUntilDate": lock.retain_until},
        )

    assert sha256(store.get_bytes("worm")) == sha256(data)
    assert versions(seaweedfs, s3_lock_bucket, full) == [version]


def test_governance_lock_refuses_plain_delete(make_store, s3_lock_bucket, seaweedfs):
    store = make_store(s3_lock_bucket, object_lock={"mode": "GOVERNANCE", "retain_days": 1})
    lock = store.default_lock.lock_from(dt.datetime.now(dt.UTC))
    store.put_bytes("gov", b"governed", lock=lock)
    assert store.lock_of("gov").mode == "GOVERNANCE"

    with pytest.raises(ObjectLockedError, match="under GOVERNANCE retention"):
        store.delete("gov")
    full = f"{PREFIX}/gov"
    (version,) = versions(seaweedfs, s3_lock_bucket, full)
    client = seaweedfs.client()
    with pytest.raises(ClientError, match="AccessDenied"):
        client.delete_object(Bucket=s3_lock_bucket, Key=full, VersionId=version["VersionId"])
    assert store.get_bytes("gov") == b"governed"

    # What tells GOVERNANCE from COMPLIANCE: an admin may deliberately bypass it.
    client.delete_object(
        Bucket=s3_lock_bucket,
        Key=full,
        VersionId=version["VersionId"],
        BypassGovernanceRetention=True,
    )
    assert not store.exists("gov")


def test_delete_removes_every_version_once_unlocked(make_store, s3_lock_bucket, seaweedfs):
    store = make_store(s3_lock_bucket)
    full = f"{PREFIX}/short"
    # Long enough that a loaded machine still tries the delete inside the lock.
    until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=8)
    store.put_bytes("short", b"brief", lock=ObjectLock("COMPLIANCE", until))
    # A plain DELETE by someone else only hides the object behind a delete marker.
    seaweedfs.client().delete_object(Bucket=s3_lock_bucket, Key=full)
    with pytest.raises(ObjectLockedError):
        store.delete("short")

    time.sleep(max(0.0, (until - dt.datetime.now(dt.UTC)).total_seconds()) + 1.1)
    store.delete("short")

    assert versions(seaweedfs, s3_lock_bucket, full) == []
    store.delete("short")  # missing is not an error


def test_delete_in_unversioned_bucket(make_store, s3_bucket, seaweedfs):
    store = make_store(s3_bucket)
    store.put_bytes("gone", b"x")
    store.delete("gone")
    assert not store.exists("gone")
    assert versions(seaweedfs, s3_bucket, f"{PREFIX}/gone") == []
    store.delete("never-written")


# --- leftovers ----------------------------------------------------------------------------------


def test_cleanup_incomplete_aborts_only_its_own_abandoned_uploads(make_store, s3_bucket, seaweedfs):
    store = make_store(s3_bucket)
    client = seaweedfs.client()
    ours = "blob/data/blob-20261127T000000.000Z-0123abcd.tar.zst.age"
    abandoned = client.create_multipart_upload(Bucket=s3_bucket, Key=f"{PREFIX}/{ours}")
    client.upload_part(
        Bucket=s3_bucket,
        Key=f"{PREFIX}/{ours}",
        UploadId=abandoned["UploadId"],
        PartNumber=1,
        Body=b"partial",
    )
    # Another writer's upload under the same prefix, and one outside it.
    neighbour = client.create_multipart_upload(Bucket=s3_bucket, Key=f"{PREFIX}/killed/run")
    foreign = client.create_multipart_upload(Bucket=s3_bucket, Key="someone-else/upload")

    assert store.cleanup_incomplete(dt.timedelta(hours=1), is_copy_key) == []
    assert store.cleanup_incomplete(dt.timedelta(0), is_copy_key) == [ours]

    assert sorted(upload["Key"] for upload in uploads(seaweedfs, s3_bucket)) == sorted(
        [f"{PREFIX}/killed/run", "someone-else/upload"]
    )
    client.abort_multipart_upload(
        Bucket=s3_bucket, Key=f"{PREFIX}/killed/run", UploadId=neighbour["UploadId"]
    )
    client.abort_multipart_upload(
        Bucket=s3_bucket, Key="someone-else/upload", UploadId=foreign["UploadId"]
    )
