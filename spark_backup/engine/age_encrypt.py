"""Encrypt a stream to age X25519 recipients (the age v1 format, https://age-encryption.org/v1),
with the ChaCha20-Poly1305, X25519, HKDF and HMAC of ``cryptography`` (OpenSSL).

Backups encrypt here rather than with pyrage: pyrage encrypts at about 0.6 GB/s of CPU and holds
the interpreter lock all the while, so a backup's reading, hashing and compression waited for
it; OpenSSL's ChaCha20-Poly1305 runs at about 3 GB/s, and the lock is held for one 64 KiB chunk
at a time. What this writes is an ordinary age file: ``age -d``, rage and pyrage open it (the
tests decrypt with each). ``age_decrypt`` opens it again: streams in the age worker, packs
of the blob layer held whole in memory.

The format, as the specification lays it out::

    age-encryption.org/v1
    -> X25519 <ephemeral share, base64>        one stanza per recipient: the file key
    <wrapped file key, base64>                 wrapped to that recipient
    --- <HMAC-SHA256 of the header, base64>
    <16-byte nonce><payload: 64 KiB chunks, each sealed with ChaCha20-Poly1305>

A fresh random file key per stream (so the payload key and its counter nonces never repeat), a
fresh ephemeral X25519 key per recipient; the last chunk carries the final flag, so a cut-short
file does not decrypt.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import os
from collections.abc import Iterable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from spark_backup.engine.streams import Writable

CHUNK = 64 * 1024  # plaintext bytes per payload chunk, fixed by the format
_TAG = 16  # Poly1305's tag, after each sealed chunk
_INTRO = b"age-encryption.org/v1\n"
_X25519_LABEL = b"age-encryption.org/v1/X25519"
_BECH32_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_BECH32_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def _hkdf(key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


def _b64(data: bytes) -> bytes:
    """age's base64: standard alphabet, no padding."""
    return base64.b64encode(data).rstrip(b"=")


def recipient_key(text: str) -> bytes:
    """The 32-byte X25519 public key of an ``age1...`` recipient (Bech32, checksum checked);
    ``ValueError`` if it is none."""
    text = text.strip()
    if text.lower() != text or not text.startswith("age1"):
        raise ValueError("not an age X25519 recipient")
    return bech32_key("age", text[4:], "an age X25519 recipient")


def bech32_key(hrp: str, data_part: str, what: str) -> bytes:
    """The 32 bytes a lower-case Bech32 string (``hrp``, "1", ``data_part``) carries, its
    checksum checked; ``ValueError`` saying it is not ``what`` (never quoting the text: an
    identity is a secret)."""
    try:
        data = [_BECH32_CHARSET.index(c) for c in data_part]
    except ValueError:
        raise ValueError(f"not {what}") from None
    if len(data) < 6 or _bech32_polymod([*_hrp_expand(hrp), *data]) != 1:
        raise ValueError(f"not {what} (bad checksum)")
    value, bits, key = 0, 0, bytearray()
    for digit in data[:-6]:
        value, bits = (value << 5) | digit, bits + 5
        if bits >= 8:
            bits -= 8
            key.append((value >> bits) & 0xFF)
    if len(key) != 32 or (value & ((1 << bits) - 1)) or bits >= 5:
        raise ValueError(f"not {what} (wrong length)")
    return bytes(key)


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _bech32_polymod(values: list[int]) -> int:
    check = 1
    for value in values:
        top = check >> 25
        check = (check & 0x1FFFFFF) << 5 ^ value
        for i, generator in enumerate(_BECH32_GENERATOR):
            if (top >> i) & 1:
                check ^= generator
    return check


def _header(file_key: bytes, recipients: Iterable[bytes]) -> bytes:
    lines = [_INTRO]
    for recipient in recipients:
        ephemeral = X25519PrivateKey.generate()
        share = ephemeral.public_key().public_bytes_raw()
        # cryptography refuses a low-order public key (an all-zero shared secret), as age must.
        secret = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
        wrap_key = _hkdf(secret, share + recipient, _X25519_LABEL)
        body = ChaCha20Poly1305(wrap_key).encrypt(bytes(12), file_key, None)
        # 32 bytes are 43 base64 characters: one line, shorter than a full one of 64.
        lines.append(b"-> X25519 " + _b64(share) + b"\n" + _b64(body) + b"\n")
    lines.append(b"---")
    header = b"".join(lines)
    mac = hmac.new(_hkdf(file_key, b"", b"header"), header, hashlib.sha256).digest()
    return header + b" " + _b64(mac) + b"\n"


class AgeEncryptor:
    """A writer that encrypts what it is given into ``sink`` as one age file; ``close()``
    seals the last chunk. Whatever the sizes written, the sink gets whole sealed chunks."""

    def __init__(self, sink: Writable, recipients: Iterable[str]):
        keys = [recipient_key(r) for r in recipients]
        if not keys:
            raise ValueError("no recipients")
        file_key = os.urandom(16)
        nonce = os.urandom(16)
        self._aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        self._sink = sink
        self._counter = 0
        # Plaintext not sealed yet: a full chunk waits until more follows, since only the
        # last chunk may carry the final flag.
        self._pending = bytearray()
        self._sealed = bytearray()  # the buffer ``write`` seals into
        self._closed = False
        sink.write(_header(file_key, keys) + nonce)

    def write(self, data: bytes) -> int:
        if self._closed:
            raise ValueError("write to a closed age encryptor")
        view = memoryview(data).cast("B")
        if len(self._pending) + len(view) <= CHUNK:
            self._pending += view
            return len(data)
        # Whole chunks are sealed into one buffer kept from write to write (no chunk objects,
        # no joining them); a sink must not keep what it is given, as io's writers do not.
        # The last 1 to 64 KiB stay pending: only the last chunk may carry the final flag.
        whole = (len(self._pending) + len(view) - 1) // CHUNK
        size = whole * (CHUNK + _TAG)
        if len(self._sealed) < size:
            self._sealed = bytearray(size)
        out = memoryview(self._sealed)
        at = 0
        if self._pending:
            room = CHUNK - len(self._pending)
            self._pending += view[:room]
            view = view[room:]
            self._seal_into(self._pending, False, out[: CHUNK + _TAG])
            self._pending = bytearray()
            at, whole = CHUNK + _TAG, whole - 1
        for start in range(0, whole * CHUNK, CHUNK):
            self._seal_into(view[start : start + CHUNK], False, out[at : at + CHUNK + _TAG])
            at += CHUNK + _TAG
        self._pending += view[whole * CHUNK :]
        self._sink.write(out[:at])
        return len(data)

    def close(self) -> None:
        """Seal the final chunk (empty only if nothing was written at all)."""
        if not self._closed:
            self._closed = True
            self._sink.write(self._seal(self._pending, True))
            self._pending.clear()

    def _nonce(self, final: bool) -> bytes:
        nonce = self._counter.to_bytes(11, "big") + (b"\x01" if final else b"\x00")
        self._counter += 1
        return nonce

    def _seal(self, chunk: bytes | bytearray | memoryview, final: bool) -> bytes:
        return self._aead.encrypt(self._nonce(final), chunk, None)

    def _seal_into(
        self, chunk: bytes | bytearray | memoryview, final: bool, out: memoryview
    ) -> None:
        self._aead.encrypt_into(self._nonce(final), chunk, None, out)


def encrypt_bytes(data: bytes, recipients: Iterable[str]) -> bytes:
    """``data`` as one age file (a pack of the blob layer: whole in memory by design)."""
    sink = io.BytesIO()
    encryptor = AgeEncryptor(sink, recipients)
    encryptor.write(data)
    encryptor.close()
    return sink.getvalue()


def encrypt_into(plain: bytes | memoryview, recipients: Iterable[str], allocate) -> memoryview:
    """``plain`` as one age file, sealed straight into a buffer of its exact size from
    ``allocate`` (a pack of the blob layer, whole in memory by design: the buffer can be one
    used before, which spares the page faults of a fresh 16 MiB)."""
    keys = [recipient_key(r) for r in recipients]
    if not keys:
        raise ValueError("no recipients")
    plain = memoryview(plain)
    file_key = os.urandom(16)
    nonce = os.urandom(16)
    aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
    head = _header(file_key, keys) + nonce
    count = max(1, -(-len(plain) // CHUNK))
    out = memoryview(allocate(len(head) + len(plain) + 16 * count))
    out[: len(head)] = head
    at = len(head)
    for index in range(count):
        piece = plain[index * CHUNK : (index + 1) * CHUNK]
        final = index == count - 1
        chunk_nonce = index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")
        aead.encrypt_into(chunk_nonce, piece, None, out[at : at + len(piece) + 16])
        at += len(piece) + 16
    return out
