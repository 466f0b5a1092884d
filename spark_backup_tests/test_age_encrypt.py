"""The age encryption backups use (engine/age_encrypt.py): what it writes opens with rage
(pyrage) and with the reference ``age`` command, and nowhere else."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pyrage
import pytest
from pyrage import x25519

from spark_backup.engine.age_encrypt import CHUNK, AgeEncryptor, encrypt_into, recipient_key


def _encrypt(data: bytes, recipients: list[str], step: int) -> bytes:
    sink = io.BytesIO()
    encryptor = AgeEncryptor(sink, recipients)
    for at in range(0, len(data), step):
        encryptor.write(data[at : at + step])
    encryptor.close()
    return sink.getvalue()


# Empty, around one and two payload chunks (the last chunk carries the final flag, and is a
# whole one when the size is a multiple of 64 KiB), and several chunks written unevenly.
@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 7])
@pytest.mark.parametrize("step", [1000, CHUNK, 1 << 20])
def test_every_recipient_opens_it_with_rage(size: int, step: int) -> None:
    identities = [x25519.Identity.generate() for _ in range(2)]
    data = os.urandom(size)
    encrypted = _encrypt(data, [str(i.to_public()) for i in identities], step)
    for identity in identities:
        assert pyrage.decrypt(encrypted, [identity]) == data
    with pytest.raises(pyrage.DecryptError):
        pyrage.decrypt(encrypted, [x25519.Identity.generate()])


def test_the_age_command_opens_it_and_refuses_it_cut_short_or_altered(tmp_path: Path) -> None:
    identity = x25519.Identity.generate()
    key = tmp_path / "key.txt"
    key.write_text(f"{identity}\n")
    data = os.urandom(3 * CHUNK + 100)
    encrypted = _encrypt(data, [str(identity.to_public())], 1 << 20)

    def age_decrypt(blob: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["age", "-d", "-i", str(key)], input=blob, capture_output=True)

    opened = age_decrypt(encrypted)
    assert opened.returncode == 0 and opened.stdout == data
    mac = encrypted.index(b"\n--- ") + 5
    other = b"B" if encrypted[mac : mac + 1] == b"A" else b"A"
    for damaged in (
        encrypted[: -(100 + 16)],  # the last chunk gone: the one before is not final
        encrypted[:-1],
        encrypted[:mac] + other + encrypted[mac + 1 :],  # the header's MAC
        encrypted[:-50] + bytes([encrypted[-50] ^ 1]) + encrypted[-49:],  # a payload bit
    ):
        assert age_decrypt(damaged).returncode != 0


def test_a_recipient_is_decoded_only_when_it_is_a_whole_age_key() -> None:
    public = str(x25519.Identity.generate().to_public())
    assert len(recipient_key(public)) == 32
    typo = public[:-1] + ("q" if public[-1] != "q" else "p")
    for text in (typo, public.upper(), public[:-2], "age1", "ssh-ed25519 AAAA", ""):
        with pytest.raises(ValueError):
            recipient_key(text)
    with pytest.raises(ValueError):
        AgeEncryptor(io.BytesIO(), [])


@pytest.mark.parametrize("size", [0, 1, CHUNK, 2 * CHUNK + 3])
def test_a_pack_sealed_into_a_reused_buffer_opens_with_age_and_rage(
    tmp_path: Path, size: int
) -> None:
    identity = x25519.Identity.generate()
    key = tmp_path / "key.txt"
    key.write_text(f"{identity}\n")
    data = os.urandom(size)
    used = bytearray(os.urandom(size + 4096))  # a buffer holding an earlier pack's bytes
    sealed = encrypt_into(data, [str(identity.to_public())], lambda n: memoryview(used)[:n])
    assert pyrage.decrypt(bytes(sealed), [identity]) == data
    opened = subprocess.run(["age", "-d", "-i", str(key)], input=bytes(sealed), capture_output=True)
    assert opened.returncode == 0 and opened.stdout == data
