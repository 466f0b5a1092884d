"""Decrypt an age stream in a process of its own.

pyrage holds the interpreter lock while it decrypts, so in the restoring process decryption
could not overlap with decompression, hashing and writing; in a worker process it runs on
another core (restores of large copies run about 1.6 times faster). The worker also hashes the
ciphertext it reads, so the stored digest costs the restoring process nothing.

The private key reaches the worker through an inherited pipe, never through its arguments or
environment (which other users may read from /proc). Protocol:

    python -m spark_backup.engine.age_worker IDENTITY_FD STATUS_FD
    stdin: the stored (encrypted) bytes; stdout: the plaintext
    IDENTITY_FD: age identities, one per line, then end of file
    STATUS_FD: one JSON line at the end, {"ok": true, "sha256": ..., "bytes": ...}
               or {"ok": false, "error": "damaged" | "no_matching_keys" | "...", "detail": ...}
"""

from __future__ import annotations

import json
import os
import signal
import sys

import pyrage

from spark_backup.engine.crypto import identities_from_text
from spark_backup.engine.streams import CHUNK_SIZE, HashingReader


def main(argv: list[str]) -> int:
    # Ctrl-C reaches the whole process group; the restoring process decides, and closes the
    # pipe, which stops this worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    identity_fd, status_fd = int(argv[0]), int(argv[1])
    with os.fdopen(identity_fd, "r", encoding="utf-8") as handle:
        identities = identities_from_text(handle.read(), "the identity pipe")
    stored = HashingReader(open(0, "rb", buffering=CHUNK_SIZE, closefd=False))  # noqa: SIM115
    plain = _PlainOut(open(1, "wb", buffering=CHUNK_SIZE, closefd=False))  # noqa: SIM115
    status: dict[str, object]
    try:
        pyrage.decrypt_io(stored, plain, identities)
        plain.flush()
        status = {"ok": True, "sha256": stored.hexdigest(), "bytes": stored.bytes}
    except (pyrage.DecryptError, OSError) as exc:
        # rage reports a failed chunk authentication as an I/O error, a wrong key or a damaged
        # header as a DecryptError; a write error is ours: the reader went away.
        if plain.broken:
            kind = "reader_gone"
        elif "no matching keys" in str(exc).lower():
            kind = "no_matching_keys"
        else:
            kind = "damaged"
        status = {"ok": False, "error": kind, "detail": str(exc), "bytes": stored.bytes}
    with os.fdopen(status_fd, "w", encoding="utf-8") as report:
        report.write(json.dumps(status) + "\n")
    return 0 if status["ok"] else 1


class _PlainOut:
    """stdout, remembering whether a write failed because the reading side closed the pipe."""

    def __init__(self, inner):
        self._inner = inner
        self.broken = False

    def write(self, data: bytes) -> int:
        try:
            return self._inner.write(data)
        except OSError:
            self.broken = True
            raise

    def flush(self) -> None:
        self._inner.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
