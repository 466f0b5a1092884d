"""Signed manifests and WAL objects: authenticity, which age alone does not give.

age encrypts to a public recipient, so anyone who can write to the store and knows that public
key can make a consistent forgery: new data, re-encrypted, with a manifest whose digests match.
A signature made with an Ed25519 key held apart from the store (in a secrets backend, read only
where backups run) closes that: ``verify`` and every restore check it against the plan's
trusted public keys before they trust a manifest's digests, and the digests cover the data.

What is signed (``spark-backup.signature/v1``):

- a manifest: the domain line ``spark-backup.manifest-signature/v1`` and a newline, then the
  manifest as canonical JSON (keys sorted, no whitespace, UTF-8) without its ``signature``;
- a WAL object: the domain line ``spark-backup.wal-signature/v1``, then the object's key. The
  key names the source, the WAL file and the sha256 of its content, which ``wal-fetch`` checks
  after decrypting, so signing the key signs the content.

The signature lives in the manifest (``signature``) and beside a WAL object (``<key>.sig``) as
``{"algorithm": "ed25519", "public_key": "ed25519:<base64>", "value": "<base64>"}``.

Unsigned manifests are those of release 0.1.0 and of plans without ``signing``. With signing
configured they are accepted only if their manifest object was stored before
``unsigned_until`` (the store's own time, which an S3 client cannot set), and are reported as
unsigned; any later unsigned manifest is refused as a forgery, and ``refuse_unsigned`` refuses
them all.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import Field, field_validator

from spark_backup.engine.manifest import Manifest
from spark_backup.engine.secrets.refs import SecretReference
from spark_backup.engine.settings import SettingsModel
from spark_backup.errors import SecretError, SignatureError

ALGORITHM = "ed25519"
PUBLIC_KEY_PREFIX = "ed25519:"
MANIFEST_DOMAIN = b"spark-backup.manifest-signature/v1\n"
WAL_DOMAIN = b"spark-backup.wal-signature/v1\n"
SIGNATURE_SUFFIX = ".sig"

Verdict = Literal["signed", "unsigned", "not checked"]


class SigningConfig(SettingsModel):
    """The plan's ``signing`` section."""

    # The private key (PEM, as ``openssl genpkey -algorithm ed25519`` writes it), by reference:
    # needed only where backups run.
    key: SecretReference | None = None
    # Public keys whose signatures are trusted: the current one, and earlier ones until the
    # last copy they signed has expired.
    public_keys: list[str] = Field(min_length=1)
    # Unsigned manifests stored before this time are copies of an earlier release: reported as
    # unsigned and accepted. Without it, every unsigned manifest is refused.
    unsigned_until: dt.datetime | None = None
    refuse_unsigned: bool = False

    @field_validator("public_keys")
    @classmethod
    def _valid_keys(cls, value: list[str]) -> list[str]:
        for key in value:
            parse_public_key(key)
        return value

    @field_validator("unsigned_until")
    @classmethod
    def _aware(cls, value: dt.datetime | None) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("expected a time with a zone, e.g. 2026-11-29T00:00:00Z")
        return value


def parse_public_key(text: str):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not isinstance(text, str) or not text.startswith(PUBLIC_KEY_PREFIX):
        raise ValueError(f"expected {PUBLIC_KEY_PREFIX}<base64 of the 32-byte public key>")
    try:
        raw = base64.b64decode(text.removeprefix(PUBLIC_KEY_PREFIX), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ValueError(
            f"expected {PUBLIC_KEY_PREFIX}<base64 of the 32-byte public key>, got {text[:24]!r}"
        ) from None


def public_key_text(key) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return PUBLIC_KEY_PREFIX + base64.b64encode(raw).decode()


def manifest_payload(manifest: Manifest) -> bytes:
    data = asdict(manifest)
    data.pop("signature", None)
    # Fields added later are signed only when set: earlier signatures stay valid.
    if data.get("data_version") is None:
        data.pop("data_version", None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return MANIFEST_DOMAIN + canonical.encode("utf-8")


def wal_payload(key: str) -> bytes:
    return WAL_DOMAIN + key.encode() + b"\n"


class Signer:
    """Signs with one Ed25519 private key."""

    def __init__(self, private_key):
        self._key = private_key
        self.public_key = public_key_text(private_key.public_key())

    @classmethod
    def from_pem(cls, pem: str, origin: str) -> Signer:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        try:
            key = load_pem_private_key(pem.encode(), password=None)
        except (ValueError, TypeError):
            # The text may be a key: say where it is, never what it is.
            raise SecretError(f"{origin}: not a PEM private key without a passphrase") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SecretError(f"{origin}: not an Ed25519 key (openssl genpkey -algorithm ed25519)")
        return cls(key)

    @classmethod
    def generate(cls) -> tuple[Signer, str]:
        """A new key and its PEM (for ``signing keygen`` and tests)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import (
            Encoding,
            NoEncryption,
            PrivateFormat,
        )

        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
        return cls(key), pem

    def signature(self, payload: bytes) -> dict[str, str]:
        return {
            "algorithm": ALGORITHM,
            "public_key": self.public_key,
            "value": base64.b64encode(self._key.sign(payload)).decode(),
        }

    def sign_manifest(self, manifest: Manifest) -> Manifest:
        from dataclasses import replace

        unsigned = replace(manifest, signature=None)
        return replace(unsigned, signature=self.signature(manifest_payload(unsigned)))

    def sign_wal(self, key: str) -> bytes:
        """The sidecar ``<key>.sig`` of a WAL object."""
        return (json.dumps(self.signature(wal_payload(key)), sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class Verifier:
    """Checks signatures against the plan's trusted public keys. Without ``signing`` in the
    plan (``trusted`` empty) nothing is checked and every copy is ``not checked``."""

    trusted: tuple[str, ...] = ()
    unsigned_until: dt.datetime | None = None
    refuse_unsigned: bool = False

    @classmethod
    def from_config(cls, config: SigningConfig | None) -> Verifier:
        if config is None:
            return cls()
        return cls(tuple(config.public_keys), config.unsigned_until, config.refuse_unsigned)

    @property
    def enabled(self) -> bool:
        return bool(self.trusted)

    def check_manifest(
        self, manifest: Manifest, stored_at: dt.datetime | None, origin: str
    ) -> Verdict:
        """``signed`` or ``unsigned`` (an accepted earlier copy); ``SignatureError`` naming the
        copy otherwise. ``stored_at`` is the store's time for the manifest object."""
        if not self.enabled:
            return "not checked"
        if manifest.signature is None:
            self._allow_unsigned(f"copy {manifest.id}", stored_at, origin)
            return "unsigned"
        self.check_signature(
            manifest.signature, manifest_payload(manifest), f"copy {manifest.id}", origin
        )
        return "signed"

    def check_wal(
        self, key: str, sidecar: bytes | None, stored_at: dt.datetime | None, origin: str
    ) -> Verdict:
        """As ``check_manifest``, for a WAL object and its sidecar (None if there is none)."""
        if not self.enabled:
            return "not checked"
        what = f"WAL object {key}"
        if sidecar is None:
            self._allow_unsigned(what, stored_at, origin)
            return "unsigned"
        try:
            signature = json.loads(sidecar)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SignatureError(f"{origin}: {what}: its signature is not valid JSON") from None
        self.check_signature(signature, wal_payload(key), what, origin)
        return "signed"

    def _allow_unsigned(self, what: str, stored_at: dt.datetime | None, origin: str) -> None:
        if self.refuse_unsigned:
            raise SignatureError(
                f"{origin}: {what} is unsigned, and the plan refuses unsigned copies "
                "(signing.refuse_unsigned)"
            )
        if self.unsigned_until is None or stored_at is None or stored_at >= self.unsigned_until:
            cutoff = self.unsigned_until.isoformat() if self.unsigned_until else "unset"
            raise SignatureError(
                f"{origin}: {what} is unsigned but was stored after signing began "
                f"(signing.unsigned_until: {cutoff}): refusing it as a possible forgery"
            )

    def check_signature(self, signature: Any, payload: bytes, what: str, origin: str) -> None:
        """``SignatureError`` unless ``signature`` is a trusted key's over ``payload``."""
        from cryptography.exceptions import InvalidSignature

        if not isinstance(signature, Mapping) or signature.get("algorithm") != ALGORITHM:
            raise SignatureError(f"{origin}: {what}: unknown signature algorithm")
        public = signature.get("public_key")
        if public not in self.trusted:
            raise SignatureError(
                f"{origin}: {what} is signed by a key the plan does not trust "
                f"({str(public)[:20]}...): refusing it"
            )
        try:
            value = base64.b64decode(str(signature.get("value", "")), validate=True)
            parse_public_key(public).verify(value, payload)
        except (ValueError, InvalidSignature):
            raise SignatureError(
                f"{origin}: {what}: the signature does not match its content: the copy or its "
                "manifest was altered or forged; refusing it"
            ) from None
