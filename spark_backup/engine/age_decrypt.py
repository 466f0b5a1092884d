"""Decrypt age files with X25519 identities, with the ChaCha20-Poly1305, X25519, HKDF and HMAC
of ``cryptography`` (OpenSSL): the counterpart of ``age_encrypt``. ``decrypt_bytes`` opens a
file held in memory (a pack of the blob layer), ``decrypt_stream`` one read as a stream (the
age worker's copies and WAL segments).

Both decrypt here rather than with pyrage: pyrage decrypts at about 0.5 GB/s of CPU and holds
the interpreter lock all the while; OpenSSL opens the 64 KiB chunks at about 3 GB/s (5 GB/s on
the benchmark VM), straight into the buffer handed back, and the lock is held for one chunk at
a time.

What is checked, as the specification (https://age-encryption.org/v1) asks: the header's
form; the file key comes only from an X25519 stanza one of the identities opens (a file with
none, or with only other stanza types, is refused: ``no_matching_keys``); the header MAC
(compared in constant time); every payload chunk's tag under its counter nonce; the final
flag on the last chunk and on no other, so a file cut short at a chunk boundary is refused, as
is anything after the final chunk, and an empty final chunk after others. pyrage stays the
reference: the tests decrypt the same files with both, and files the ``age`` command wrote.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from spark_backup.engine.age_encrypt import CHUNK, _hkdf, bech32_key
from spark_backup.engine.streams import Readable

if TYPE_CHECKING:
    from pyrage import x25519

_INTRO = b"age-encryption.org/v1\n"
_X25519_LABEL = b"age-encryption.org/v1/X25519"
_TAG = 16
_SEALED_CHUNK = CHUNK + _TAG
_SECRET_HRP = "age-secret-key-"
# What ``_parse_header`` looks at (a header of a few recipients is well below 64 KiB), and the
# payload nonce after it.
_HEADER_READ = 64 * 1024 + 16
Buffer = Any  # bytes, bytearray, mmap, memoryview: what the buffer protocol gives


class AgeDecryptError(Exception):
    """The file does not decrypt; ``kind`` is ``no_matching_keys`` or ``damaged``."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def identity_key(text: str) -> X25519PrivateKey:
    """The X25519 private key of an ``AGE-SECRET-KEY-1...`` identity (Bech32, checksum
    checked); ``ValueError`` if it is none. Never part of an error message: it is a secret."""
    text = text.strip()
    if text.upper() != text or not text.lower().startswith(_SECRET_HRP + "1"):
        raise ValueError("not an age X25519 identity")
    data_part = text[len(_SECRET_HRP) + 1 :].lower()
    return X25519PrivateKey.from_private_bytes(
        bech32_key(_SECRET_HRP, data_part, "an age X25519 identity")
    )


class Identities:
    """X25519 identities, parsed once, with their public keys (which the wrap key mixes in)."""

    def __init__(self, identities: list[x25519.Identity] | list[str]):
        self._keys = []
        for identity in identities:
            private = identity_key(str(identity))
            public = private.public_key().public_bytes_raw()
            self._keys.append((private, public))

    def file_key(self, stanzas: list[tuple[list[bytes], bytes]]) -> bytes | None:
        """The file key from the first X25519 stanza an identity opens, or None."""
        for args, body in stanzas:
            if args[0] != b"X25519":
                continue  # another type of recipient: none of these identities opens it
            share = _unb64(args[1]) if len(args) == 2 else None
            if share is None or len(share) != 32 or len(body) != 32:
                raise AgeDecryptError("damaged", "age header: a malformed X25519 stanza")
            for private, public in self._keys:
                try:
                    # cryptography refuses a low-order share (an all-zero secret), as age must.
                    secret = private.exchange(X25519PublicKey.from_public_bytes(share))
                except ValueError:
                    raise AgeDecryptError(
                        "damaged", "age header: an X25519 share of low order"
                    ) from None
                wrap_key = _hkdf(secret, share + public, _X25519_LABEL)
                try:
                    return ChaCha20Poly1305(wrap_key).decrypt(bytes(12), body, None)
                except InvalidTag:
                    continue
        return None


def _unb64(text: bytes) -> bytes | None:
    """age's base64 (standard alphabet, no padding, canonical), or None."""
    if not text or b"=" in text or len(text) % 4 == 1:
        return None
    try:
        data = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        return None
    return data if base64.b64encode(data).rstrip(b"=") == text else None


def _parse_header(sealed: memoryview) -> tuple[list[tuple[list[bytes], bytes]], bytes, bytes, int]:
    """(stanzas as (arguments, body), the header up to ``---`` for the MAC, the MAC, and the
    offset where the payload nonce starts)."""
    if bytes(sealed[: len(_INTRO)]) != _INTRO:
        raise AgeDecryptError("damaged", "not an age v1 file")
    head = bytes(sealed[: 64 * 1024])  # a header of a few recipients is well below this
    at = len(_INTRO)
    stanzas = []
    while True:
        end = head.find(b"\n", at)
        if end < 0:
            raise AgeDecryptError("damaged", "age header: cut short")
        line = head[at:end]
        if line.startswith(b"--- "):
            mac = _unb64(line[4:])
            if mac is None or len(mac) != 32:
                raise AgeDecryptError("damaged", "age header: a malformed MAC line")
            return stanzas, head[: at + 3], mac, end + 1
        if not line.startswith(b"-> "):
            raise AgeDecryptError("damaged", "age header: a line that is no stanza")
        args = line[3:].split(b" ")
        if not all(args):
            raise AgeDecryptError("damaged", "age header: an empty stanza argument")
        at = end + 1
        body = b""
        while True:  # body lines of 64 columns, the last one shorter (maybe empty)
            end = head.find(b"\n", at)
            if end < 0:
                raise AgeDecryptError("damaged", "age header: cut short")
            line = head[at:end]
            at = end + 1
            if len(line) > 64:
                raise AgeDecryptError("damaged", "age header: a stanza line too long")
            if line:
                part = _unb64(line)
                if part is None:
                    raise AgeDecryptError("damaged", "age header: a stanza body not base64")
                body += part
            if len(line) < 64:
                break
        stanzas.append((args, body))


def _payload_cipher(sealed: memoryview, identities: Identities) -> tuple[ChaCha20Poly1305, int]:
    """Check the header of the age file that ``sealed`` starts with (at least its first 64 KiB,
    or all of it); the payload's cipher, and the offset of the payload's first chunk."""
    stanzas, header, mac, at = _parse_header(sealed)
    file_key = identities.file_key(stanzas)
    if file_key is None:
        raise AgeDecryptError("no_matching_keys", "no identity matched any of the recipients")
    expected = hmac.new(_hkdf(file_key, b"", b"header"), header, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, mac):
        raise AgeDecryptError("damaged", "age header: its MAC does not match")
    nonce = bytes(sealed[at : at + 16])
    if len(nonce) != 16:
        raise AgeDecryptError("damaged", "age payload: cut short")
    return ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload")), at + 16


def _check_final_chunk(sealed_bytes: int, index: int) -> None:
    """The final chunk holds its tag and, unless it is the only one, at least one byte."""
    if sealed_bytes < _TAG or (sealed_bytes == _TAG and index > 0):
        raise AgeDecryptError("damaged", "age payload: a final chunk cut short or empty")


def _open_chunks(
    aead: ChaCha20Poly1305, sealed: memoryview, first: int, final: bool, out: memoryview
) -> None:
    """Open the chunks in ``sealed``, numbered from ``first``, into ``out``; the last of them
    is the file's final chunk when ``final``."""
    count = -(-len(sealed) // _SEALED_CHUNK)
    index = first
    try:
        for n in range(count):
            index = first + n
            start = n * _SEALED_CHUNK
            end = min(start + _SEALED_CHUNK, len(sealed))
            flag = b"\x01" if final and n == count - 1 else b"\x00"
            aead.decrypt_into(
                index.to_bytes(11, "big") + flag,
                sealed[start:end],
                None,
                out[n * CHUNK : n * CHUNK + end - start - _TAG],
            )
    except InvalidTag:
        raise AgeDecryptError(
            "damaged", f"age payload: chunk {index} does not authenticate (damaged or cut short)"
        ) from None


def decrypt_bytes(
    sealed: Buffer, identities: Identities, allocate: Callable[[int], Buffer] = bytearray
) -> Buffer:
    """The plaintext of one age file held whole in memory, in a buffer of its exact size from
    ``allocate``; ``AgeDecryptError`` if no identity opens it or it is damaged, cut short or
    extended."""
    view = memoryview(sealed)
    aead, at = _payload_cipher(view, identities)
    payload = view[at:]
    if not payload:
        raise AgeDecryptError("damaged", "age payload: cut short")
    count = -(-len(payload) // _SEALED_CHUNK)
    _check_final_chunk(len(payload) - (count - 1) * _SEALED_CHUNK, count - 1)
    plain = allocate(len(payload) - count * _TAG)
    _open_chunks(aead, payload, 0, True, memoryview(plain))
    return plain


# Chunks ``decrypt_stream`` opens at a time (256 KiB of plaintext), and the sealed bytes it
# reads for them.
_STREAM_CHUNKS = 4
_STREAM_READ = _STREAM_CHUNKS * _SEALED_CHUNK


def decrypt_stream(
    source: Readable, write: Callable[[bytearray], object], identities: Identities
) -> None:
    """Decrypt the age file read from ``source``, handing its plaintext to ``write`` about
    256 KiB at a time, each piece a buffer of its own that the callee may keep. The checks are
    ``decrypt_bytes``'s; since the last chunk is known only at the end of the stream, each
    piece stops short of it until ``source`` ends. Whether the file was whole is known only
    when this returns: on ``AgeDecryptError`` what was handed over must be discarded."""
    head = bytearray()
    while len(head) < _HEADER_READ:
        more = source.read(_HEADER_READ - len(head))
        if not more:
            break
        head += more
    aead, at = _payload_cipher(memoryview(head), identities)
    pending = head[at:]
    index = 0
    ended = False
    while not ended:
        more = source.read(_STREAM_READ)
        ended = not more
        pending += more
        if ended:
            if not pending and index == 0:
                raise AgeDecryptError("damaged", "age payload: cut short")
            count = -(-len(pending) // _SEALED_CHUNK)
            _check_final_chunk(len(pending) - (count - 1) * _SEALED_CHUNK, index + count - 1)
        else:
            count = (len(pending) - 1) // _SEALED_CHUNK  # a byte follows each: none is the last
            if count < _STREAM_CHUNKS:
                continue
        sealed = count * _SEALED_CHUNK if not ended else len(pending)
        plain = bytearray(sealed - count * _TAG)
        _open_chunks(aead, memoryview(pending)[:sealed], index, ended, memoryview(plain))
        del pending[:sealed]
        index += count
        if plain:
            write(plain)
