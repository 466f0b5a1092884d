"""Chunks: their references, and the one-object-per-chunk layout of the first release.

Until packs (``packs.py``) each chunk was an object of its own,
``<scope>/chunks/<id[:2]>/<id>.zst.age`` holding ``age(zstd(chunk))``. Versions written then
still list, verify, restore and prune: this module reads those objects; nothing writes them
any more.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import pyrage
import zstandard
from pyrage import x25519

from spark_backup.engine.stores.base import ObjectStore
from spark_backup.errors import IntegrityError

CHUNK_LAYERS = ["age", "zstd"]


@dataclass(frozen=True)
class ChunkRef:
    id: str
    sha256: str  # of the plaintext
    size: int
    # Where the chunk is: a pack, and its zstd frame's offset and length in the pack's
    # plaintext. None: a chunk object of the first release's layout.
    pack: str | None = None
    offset: int = 0
    length: int = 0


# --- the first release's layout: one object per chunk -----------------------------------------


def chunks_prefix(scope: str) -> str:
    return f"{scope}/chunks/"


def chunk_key(scope: str, cid: str) -> str:
    return f"{scope}/chunks/{cid[:2]}/{cid}.zst.age"


def is_hex_id(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def id_of_chunk_key(key: str) -> str | None:
    name = key.rsplit("/", 1)[-1]
    if not name.endswith(".zst.age"):
        return None
    cid = name.removesuffix(".zst.age")
    return cid if is_hex_id(cid) else None


def existing_chunks(store: ObjectStore, scope: str) -> dict[str, int]:
    """Every chunk object of the scope (first release's layout), with its stored size."""
    found = {}
    for info in store.list(chunks_prefix(scope)):
        if (cid := id_of_chunk_key(info.key)) is not None:
            found[cid] = info.size
    return found


def check_chunk(plain: bytes, ref: ChunkRef, label: str) -> bytes:
    if len(plain) != ref.size or hashlib.sha256(plain).hexdigest() != ref.sha256:
        raise IntegrityError(
            f"{label}: chunk {ref.id[:16]}... does not hold the bytes the version recorded"
        )
    return plain


_LOCAL = threading.local()


def inflate(compressed: bytes | memoryview, ref: ChunkRef, label: str) -> bytes:
    """A chunk's zstd frame inflated and checked against its recorded sha256 and size."""
    decompressor = getattr(_LOCAL, "decompressor", None)
    if decompressor is None:  # one per thread: making one costs as much as a chunk's inflation
        decompressor = _LOCAL.decompressor = zstandard.ZstdDecompressor()
    try:
        plain = decompressor.decompress(compressed, max_output_size=ref.size)
    except zstandard.ZstdError as exc:
        raise IntegrityError(
            f"{label}: chunk {ref.id[:16]}... zstd stream is damaged: {exc}"
        ) from None
    return check_chunk(plain, ref, label)


def open_chunk(
    sealed: bytes, identities: list[x25519.Identity], ref: ChunkRef, label: str
) -> bytes:
    """A stored chunk object's plaintext, checked against its recorded sha256 and size."""
    try:
        compressed = pyrage.decrypt(sealed, identities)
    except pyrage.DecryptError:
        raise IntegrityError(
            f"{label}: chunk {ref.id[:16]}... does not decrypt: damaged, or encrypted to another key"
        ) from None
    return inflate(compressed, ref, label)
