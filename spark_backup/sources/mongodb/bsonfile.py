"""BSON files as mongodump writes them (documents back to back), and the content digest the
manifest records per collection.

The digest does not depend on document order: it is the sum, modulo 2^256, of the sha256 of
every raw BSON document. A dump read in natural order, a restore read back in any order and a
collection rebuilt from a dump plus oplog all give the same digest for the same documents, byte
for byte; a changed, missing or extra document changes it (a duplicate counts twice).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from spark_backup.engine.streams import Readable
from spark_backup.errors import IntegrityError

DIGEST_ALGORITHM = "sum-sha256-mod-2^256 of raw BSON documents (order-independent)"
_MODULUS = 1 << 256
# MongoDB's largest document is 16 MiB; a length beyond this is damage, not a document.
MAX_DOCUMENT_BYTES = 48 * 1024 * 1024


@dataclass
class CollectionDigest:
    documents: int = 0
    bytes: int = 0
    _sum: int = 0

    def add(self, raw: bytes) -> None:
        self.documents += 1
        self.bytes += len(raw)
        # Reduced only when read: a Python integer grows by a bit per doubling of documents.
        self._sum += int.from_bytes(hashlib.sha256(raw).digest(), "big")

    @property
    def digest(self) -> str:
        return f"{self._sum % _MODULUS:064x}"

    def summary(self) -> dict[str, int | str]:
        return {"documents": self.documents, "bytes": self.bytes, "digest": self.digest}


def iter_documents(stream: Readable, label: str) -> Iterator[bytes]:
    """Raw BSON documents from a stream of them; ``IntegrityError`` if it is cut short or a
    length is impossible."""
    while True:
        head = _read_exactly(stream, 4)
        if not head:
            return
        if len(head) < 4:
            raise IntegrityError(f"{label}: BSON file is cut short (a partial length)")
        size = int.from_bytes(head, "little", signed=True)
        if not 5 <= size <= MAX_DOCUMENT_BYTES:
            raise IntegrityError(f"{label}: BSON document length {size} is impossible")
        body = _read_exactly(stream, size - 4)
        if len(body) < size - 4 or body[-1:] != b"\0":
            raise IntegrityError(f"{label}: BSON file is cut short (a partial document)")
        yield head + body


def _read_exactly(stream: Readable, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            break
        data += chunk
    return data
