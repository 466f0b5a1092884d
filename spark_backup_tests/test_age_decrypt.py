"""The age decryption of restores (engine/age_decrypt.py), of files held in memory (packs) and
of streams (the age worker's): it opens what the ``age`` command, pyrage and age_encrypt write,
exactly as pyrage (the reference) does, and refuses whatever pyrage refuses: another key, a
header or payload altered, a file cut short at a chunk boundary or extended, a file with no
X25519 stanza."""

from __future__ import annotations

import base64
import io
import os
import subprocess

import pyrage
import pytest
from pyrage import passphrase, x25519

from spark_backup.engine.age_decrypt import (
    AgeDecryptError,
    Identities,
    decrypt_bytes,
    decrypt_stream,
    identity_key,
)
from spark_backup.engine.age_encrypt import CHUNK, encrypt_bytes

# decrypt_stream opens 4 chunks at a time, the last one held back until the stream ends.
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 7, 4 * CHUNK, 5 * CHUNK + 1]
WAYS = ["bytes", "stream", "trickle"]


class _Trickle(io.BytesIO):
    """A stream that hands out at most 1,000 bytes a read, as a pipe may."""

    def read(self, size: int | None = -1) -> bytes:
        return super().read(1000 if size is None or size < 0 else min(size, 1000))


def _decrypted(encrypted: bytes, opener: Identities, way: str) -> bytes:
    if way == "bytes":
        return bytes(decrypt_bytes(encrypted, opener))
    pieces: list[bytearray] = []
    source = io.BytesIO(encrypted) if way == "stream" else _Trickle(encrypted)
    decrypt_stream(source, pieces.append, opener)
    assert all(0 < len(piece) <= 5 * CHUNK for piece in pieces)
    return b"".join(pieces)


def _age_cli(data: bytes, recipients: list[str]) -> bytes:
    command = ["age"] + [arg for r in recipients for arg in ("-r", r)]
    return subprocess.run(command, input=data, capture_output=True, check=True).stdout


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("size", SIZES)
def test_it_opens_what_age_pyrage_and_age_encrypt_write(size: int, way: str) -> None:
    mine, other = x25519.Identity.generate(), x25519.Identity.generate()
    recipients = [str(other.to_public()), str(mine.to_public())]
    data = os.urandom(size)
    for encrypted in (
        _age_cli(data, recipients),
        pyrage.encrypt(data, [other.to_public(), mine.to_public()]),
        encrypt_bytes(data, recipients),
    ):
        assert pyrage.decrypt(encrypted, [mine]) == data
        assert _decrypted(encrypted, Identities([mine]), way) == data
        assert _decrypted(encrypted, Identities([x25519.Identity.generate(), mine]), way) == data
        if way == "bytes":
            assert bytes(decrypt_bytes(memoryview(encrypted), Identities([mine]))) == data


def _refusals(encrypted: bytes, size: int) -> list[bytes]:
    mac = encrypted.index(b"\n--- ") + 5
    other = b"B" if encrypted[mac : mac + 1] == b"A" else b"A"
    payload = encrypted.index(b"\n", mac) + 1 + 16
    damaged = [
        encrypted[:-1],
        encrypted + b"\0",
        encrypted + encrypted[payload:],  # a second final chunk after the first
        encrypted[:mac] + other + encrypted[mac + 1 :],  # the header's MAC
        encrypted[:-10] + bytes([encrypted[-10] ^ 1]) + encrypted[-9:],  # a payload bit
        encrypted[:payload],  # no payload at all
        encrypted[: payload - 8],  # the nonce cut
        encrypted[: mac - 10],  # the header cut
    ]
    if size > CHUNK:
        damaged.append(encrypted[: payload + CHUNK + 16])  # cut at a chunk boundary
    stanza = encrypted.index(b"-> X25519 ") + 10
    damaged.append(
        encrypted[:stanza] + bytes([encrypted[stanza] ^ 1]) + encrypted[stanza + 1 :]
    )  # the ephemeral share
    return damaged


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("size", [1, CHUNK, 2 * CHUNK + 5, 4 * CHUNK, 9 * CHUNK + 5])
def test_it_refuses_whatever_pyrage_refuses(size: int, way: str) -> None:
    identity = x25519.Identity.generate()
    opener = Identities([identity])
    data = os.urandom(size)
    for encrypted in (
        _age_cli(data, [str(identity.to_public())]),
        encrypt_bytes(data, [str(identity.to_public())]),
    ):
        for damaged in _refusals(encrypted, size):
            with pytest.raises(pyrage.DecryptError):
                pyrage.decrypt(damaged, [identity])
            with pytest.raises(AgeDecryptError):
                _decrypted(damaged, opener, way)


@pytest.mark.parametrize("way", WAYS)
def test_another_key_and_another_recipient_type_find_no_matching_key(way: str) -> None:
    identity = x25519.Identity.generate()
    for encrypted in (
        pyrage.encrypt(b"secret", [x25519.Identity.generate().to_public()]),
        passphrase.encrypt(b"secret", "a passphrase"),  # an scrypt stanza only
    ):
        with pytest.raises(AgeDecryptError) as refused:
            _decrypted(encrypted, Identities([identity]), way)
        assert refused.value.kind == "no_matching_keys"


def test_a_low_order_share_is_refused() -> None:
    identity = x25519.Identity.generate()
    encrypted = encrypt_bytes(b"data", [str(identity.to_public())])
    stanza = encrypted.index(b"-> X25519 ") + 10
    end = encrypted.index(b"\n", stanza)
    zero = base64.b64encode(bytes(32)).rstrip(b"=")
    with pytest.raises(AgeDecryptError) as refused:
        decrypt_bytes(encrypted[:stanza] + zero + encrypted[end:], Identities([identity]))
    assert refused.value.kind == "damaged"


def test_an_identity_is_decoded_only_when_it_is_a_whole_age_key() -> None:
    identity = x25519.Identity.generate()
    text = str(identity)
    assert Identities([text]).file_key([]) is None
    typo = text[:-1] + ("Q" if text[-1] != "Q" else "P")
    for bad in (typo, text.lower(), text[:-2], "AGE-SECRET-KEY-1", str(identity.to_public()), ""):
        with pytest.raises(ValueError):
            identity_key(bad)
