"""Chunk ids: HMAC-SHA256, under a key of the source's own, of a chunk's plaintext sha256.

The store sees only ids. Without the key it can neither confirm that a known file (a public
base model) is stored, nor tell that two sources hold an equal chunk: each source's key is
derived from the plan's chunk secret with the source's name, so equal chunks of two sources
get unrelated ids. Restores and prunes never need the key (the version document, encrypted,
records each chunk's plaintext sha256; the clear reference list holds ids only): losing it
costs one full upload, never data.
"""

from __future__ import annotations

import hashlib
import hmac

KEY_SALT = b"spark-backup.chunk-id/v1"


def derive_chunk_key(secret: str | bytes, scope: str) -> bytes:
    """The 32-byte MAC key of one scope (a source), from the plan's chunk secret."""
    # Imported here, as signing does: a plan naming an llm_artifacts source loads this module
    # (through its kind) for every command, and only a backup derives a key.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    material = secret.encode() if isinstance(secret, str) else secret
    if len(material) < 16:
        raise ValueError("the chunk secret must be at least 16 bytes")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=KEY_SALT, info=scope.encode()).derive(
        material
    )


def chunk_id(key: bytes, plaintext_sha256: bytes) -> str:
    return hmac.new(key, plaintext_sha256, hashlib.sha256).hexdigest()


def key_fingerprint(key: bytes) -> str:
    """Names the key in version documents (a changed secret shows as a new fingerprint)."""
    return hmac.new(key, b"spark-backup.chunk-key-fingerprint", hashlib.sha256).hexdigest()[:16]
