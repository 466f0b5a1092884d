"""Decrypt age files with X25519 identities, with the ChaCha20-Poly1305, X25519, HKDF and HMAC
of ``cryptography`` (OpenSSL): the counterpart of ``age_encrypt``. ``decrypt_bytes`` opens one
held in memory (a pack of the blob layer), straight into the buffer handed back;
``decrypt_stream`` one read from a stream, a chunk at a time (the age worker's copies and WAL).

Both decrypt here rather than with pyrage: pyrage decrypts at about 0.5 to 0.8 GB/s of CPU and
holds the interpreter lock all the while; OpenSSL opens the 64 KiB chunks at about twice that
speed or more, and the lock is held for one chunk at a time, so another thread of the process
can inflate and hash meanwhile.

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


def _payload_cipher(head: memoryview, identities: Identities) -> tuple[ChaCha20Poly1305, int]:
    """The payload's cipher, from the header at the start of ``head`` (its first 64 KiB at
    least, or the whole file): the file key an identity opens, the header MAC checked, the key
    derived with the payload nonce. And the offset where the sealed chunks start."""
    stanzas, header, mac, at = _parse_header(head)
    file_key = identities.file_key(stanzas)
    if file_key is None:
        raise AgeDecryptError("no_matching_keys", "no identity matched any of the recipients")
    expected = hmac.new(_hkdf(file_key, b"", b"header"), header, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, mac):
        raise AgeDecryptError("damaged", "age header: its MAC does not match")
    nonce = bytes(head[at : at + 16])
    if len(nonce) != 16:
        raise AgeDecryptError("damaged", "age payload: cut short")
    return ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload")), at + 16


def _chunk_nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


def _check_final(size: int, index: int) -> None:
    """A final chunk holds its tag and, unless it is the only one, some plaintext."""
    if size < _TAG or (size == _TAG and index > 0):
        raise AgeDecryptError("damaged", "age payload: a final chunk cut short or empty")


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
    last = len(payload) - (count - 1) * _SEALED_CHUNK
    _check_final(last, count - 1)
    plain = allocate(len(payload) - count * _TAG)
    out = memoryview(plain)
    try:
        for index in range(count):
            final = index == count - 1
            start = index * _SEALED_CHUNK
            end = start + (last if final else _SEALED_CHUNK)
            aead.decrypt_into(
                _chunk_nonce(index, final),
                payload[start:end],
                None,
                out[index * CHUNK : index * CHUNK + end - start - _TAG],
            )
    except InvalidTag:
        raise AgeDecryptError(
            "damaged", f"age payload: chunk {index} does not authenticate (damaged or cut short)"
        ) from None
    return plain


def decrypt_stream(sealed: Readable, write: Callable[[bytes], Any], identities: Identities) -> None:
    """Decrypt the age file read from ``sealed`` into ``write``, one 64 KiB chunk at a time,
    with the checks of ``decrypt_bytes``: a chunk is final when nothing follows it, so a file
    cut short at a chunk boundary, or with anything after its final chunk, fails to
    authenticate. What was written before an ``AgeDecryptError`` must not be used."""
    pending = _Pending(sealed)
    head = pending.take(_HEADER_READ)
    aead, at = _payload_cipher(memoryview(head), identities)
    pending.give_back(head[at:])
    index = 0
    while True:
        chunk = pending.take(_SEALED_CHUNK + 1)  # one byte more: is anything after this chunk?
        final = len(chunk) <= _SEALED_CHUNK
        if final:
            if not chunk and index == 0:
                raise AgeDecryptError("damaged", "age payload: cut short")
            _check_final(len(chunk), index)
        else:
            pending.give_back(chunk[_SEALED_CHUNK:])
            chunk = chunk[:_SEALED_CHUNK]
        try:
            write(aead.decrypt(_chunk_nonce(index, final), chunk, None))
        except InvalidTag:
            raise AgeDecryptError(
                "damaged",
                f"age payload: chunk {index} does not authenticate (damaged or cut short)",
            ) from None
        if final:
            return
        index += 1


# A header of a few recipients is well below this (``_parse_header`` reads no further).
_HEADER_READ = 64 * 1024
_READ_SIZE = 1 << 20


class _Pending:
    """Bytes read from a stream and not used yet: ``take(n)`` gives the next ``n`` (fewer only
    at the end), reading a megabyte at a time; ``give_back`` returns the unused end of what
    was taken. Copies only what is left over between reads, less than a chunk."""

    def __init__(self, stream: Readable):
        self._stream = stream
        self._data = memoryview(b"")
        self._at = 0

    def take(self, size: int) -> memoryview:
        if len(self._data) - self._at < size:
            parts = [bytes(self._data[self._at :])]
            have = len(parts[0])
            while have < size:
                more = self._stream.read(max(size - have, _READ_SIZE))
                if not more:
                    break
                parts.append(more)
                have += len(more)
            self._data, self._at = memoryview(b"".join(parts)), 0
        taken = self._data[self._at : self._at + size]
        self._at += len(taken)
        return taken

    def give_back(self, rest: memoryview) -> None:
        self._at -= len(rest)
