"""Crypto-shredding: a data key per source and month, so that an erasure request can be served
on copies that cannot be deleted before their Object Lock expires.

A source marked ``personal_data`` encrypts each copy not to the plan's recipients but to an age
key of its own for the month the copy starts in. That key's identity is stored in the store,
itself age-encrypted ("wrapped") to the plan's recipients, as ``<source>/keys/<YYYY-MM>.json``
and never under Object Lock. ``erase`` deletes the wrapped keys of whole months before a date
(every version of the object) and leaves a tombstone: the copies' locked objects stay until
their retention ends, but nobody can open them any more. A restore of such a copy fails with
``ErasedError``, naming the month and when it was erased.

Key objects are signed like manifests when the plan signs (``engine/signing.py``): a backup
never encrypts to a key someone else put into the store.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from dataclasses import dataclass

import pyrage
from pyrage import x25519

from spark_backup.engine.crypto import Recipients, identities_from_text
from spark_backup.engine.signing import Signer, Verifier
from spark_backup.engine.stores.base import ObjectStore
from spark_backup.errors import CryptoError, ErasedError, IntegrityError, NotFoundError, StoreError

DATA_KEY_FORMAT = "spark-backup.data-key/v1"
KEY_DOMAIN = b"spark-backup.data-key-signature/v1\n"


def month_of(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m")


def data_key_path(source: str, month: str) -> str:
    return f"{source}/keys/{month}.json"


def tombstone_path(source: str, month: str) -> str:
    return f"{source}/keys/{month}.erased.json"


@dataclass(frozen=True)
class DataKey:
    """A month's data key of a source, wrapped to one recipient."""

    source: str
    month: str
    recipient: str
    wrapped: bytes

    def document(self) -> dict[str, str]:
        return {
            "format": DATA_KEY_FORMAT,
            "source": self.source,
            "month": self.month,
            "recipient": self.recipient,
            "wrapped_identity": base64.b64encode(self.wrapped).decode(),
        }

    def payload(self) -> bytes:
        return KEY_DOMAIN + json.dumps(self.document(), sort_keys=True).encode()


def _read(store: ObjectStore, source: str, month: str, verifier: Verifier) -> DataKey:
    key = data_key_path(source, month)
    raw = store.get_bytes(key)
    uri = store.object_uri(key)
    try:
        data = json.loads(raw)
        found = DataKey(
            data["source"],
            data["month"],
            data["recipient"],
            base64.b64decode(data["wrapped_identity"]),
        )
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"{uri}: not a data key of spark-backup") from None
    if (found.source, found.month) != (source, month):
        raise IntegrityError(f"{uri}: holds the data key of {found.source} {found.month}")
    if verifier.enabled:
        signature = data.get("signature")
        if signature is None:
            raise IntegrityError(f"{uri}: the data key is unsigned; refusing to use it")
        verifier.check_signature(signature, found.payload(), f"data key {month}", uri)
    return found


def recipients_for(
    store: ObjectStore,
    source: str,
    started: dt.datetime,
    plan_recipients: Recipients,
    signer: Signer | None,
    verifier: Verifier,
) -> tuple[Recipients, str]:
    """The recipient copies of ``source`` started at ``started`` are encrypted to, and its key
    object's path; the month's key is made (wrapped to the plan's recipients) on first use."""
    month = month_of(started)
    path = data_key_path(source, month)
    try:
        found = _read(store, source, month, verifier)
    except NotFoundError:
        if store.exists(tombstone_path(source, month)):
            raise ErasedError(
                f"source {source!r}: month {month} was erased; its copies cannot be made again"
            ) from None
        identity = x25519.Identity.generate()
        wrapped = pyrage.encrypt(f"{identity}\n".encode(), plan_recipients.parsed())
        found = DataKey(source, month, str(identity.to_public()), wrapped)
        document = found.document()
        if signer is not None:
            document["signature"] = signer.signature(found.payload())  # type: ignore[assignment]
        try:
            store.put_bytes(path, (json.dumps(document, indent=2) + "\n").encode())
        except StoreError:
            if not store.exists(path):
                raise
            found = _read(store, source, month, verifier)  # a concurrent backup made it first
    return Recipients.from_keys([found.recipient], path), path


def unwrap(
    store: ObjectStore, source: str, copy_id: str, path: str, identities: list[x25519.Identity]
) -> list[x25519.Identity]:
    """The identity of a copy's data key, unwrapped with the plan's identities; ``ErasedError``
    once the key was destroyed."""
    month = path.rsplit("/", 1)[-1].removesuffix(".json")
    try:
        found = _read(store, source, month, Verifier())
    except NotFoundError:
        erased = ""
        try:
            tombstone = json.loads(store.get_bytes(tombstone_path(source, month)))
            erased = f" on {tombstone.get('erased_at', '?')}"
        except (NotFoundError, ValueError):
            pass
        raise ErasedError(
            f"copy {copy_id} was erased{erased}: the data key of {source} {month} is destroyed "
            "(crypto-shredding), so it can no longer be opened; its objects stay until their "
            "retention ends"
        ) from None
    try:
        text = pyrage.decrypt(found.wrapped, identities).decode()
    except pyrage.DecryptError:
        raise CryptoError(
            f"copy {copy_id}: none of the identities opens the data key of {source} {month}"
        ) from None
    return identities_from_text(text, f"data key {source} {month}")


def erase_months(
    store: ObjectStore, source: str, before: dt.date, now: dt.datetime, dry_run: bool
) -> list[str]:
    """Destroy the data keys of every whole month of ``source`` before ``before``; return the
    months."""
    months = []
    for info in store.list(f"{source}/keys/"):
        name = info.key.rsplit("/", 1)[-1]
        if not name.endswith(".json") or name.endswith(".erased.json"):
            continue
        month = name.removesuffix(".json")
        year, number = (int(part) for part in month.split("-"))
        month_end = dt.date(year + number // 12, number % 12 + 1, 1)
        if month_end > before:
            continue
        months.append(month)
        if not dry_run:
            tombstone = {"source": source, "month": month, "erased_at": now.isoformat()}
            if not store.exists(tombstone_path(source, month)):
                store.put_bytes(tombstone_path(source, month), json.dumps(tombstone).encode())
            store.delete(info.key)
    return sorted(months)
