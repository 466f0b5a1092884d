"""Repacking: the chunks a listed version still needs are copied out of packs that hold mostly
chunks no listed version needs, so that the sweep can delete those packs.

Versions locate each chunk themselves (pack, offset, length in their encrypted, committed
document), and committed objects are never rewritten. A chunk that moves is found through a
**move record** ``<scope>/pack-moves/<old pack>/<stamp>-<hex>.json``, written after the new
packs and their indexes are stored:

- in the clear: the old pack, the versions listed when it was repacked (``versions``: the
  record answers for those alone), and the packs its live chunks went to with their sizes, so
  prune's mark, a plain verify and replication follow a move without a key;
- sealed to the plan's recipients (age): chunk id -> new pack, offset and length (offsets
  would reveal each chunk's compressed size, as a pack index would).

A record of pack P answers for a version V only when V is in its ``versions``: every chunk of V
in P was live when P was repacked, so it is in the record (or in an earlier record of P that
answers for V). A version committed after the mark (a backup that reused a chunk of P) is not
in any record: it needs P itself, so P stays. Readers follow records (a chain, if a new pack
was repacked again) and check every chunk's plaintext sha256 as always; a chunk found in two
packs (the old one not deleted yet, or a repack that died before its record) is harmless.
Prune's mark counts, for each listed version, the packs its records lead to instead of P; P
then goes the way of any unreferenced pack (announced, deleted ``orphan_grace`` later, never
under an Object Lock).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyrage
from pyrage import x25519

from spark_backup.engine.blobs.chunks import ChunkRef
from spark_backup.engine.blobs.packs import (
    PackCache,
    PackWriter,
    existing_packs,
    id_of_pack_key,
    pack_key,
    read_chunks,
)
from spark_backup.engine.crypto import Recipients
from spark_backup.engine.manifest import utc_stamp
from spark_backup.engine.stores.base import ObjectLock, ObjectStore
from spark_backup.errors import IntegrityError, NotFoundError

MOVE_FORMAT = "spark-backup.pack-move/v1"
# A pack is rewritten when at least this share of its bytes is chunks no listed version needs
# (plan: defaults.repack_unused).
DEFAULT_UNUSED = 0.5
_CHAIN_LIMIT = 64  # moves followed for one chunk; a cycle cannot arise (new ids), but bound it


def moves_prefix(scope: str) -> str:
    return f"{scope}/pack-moves/"


@dataclass
class PackMove:
    key: str
    pack: str  # the old pack
    versions: frozenset[str]  # copy ids it answers for
    packs: dict[str, int]  # where the live chunks went (pack id -> stored size)
    sealed: bytes  # age(JSON chunk id -> [pack, offset, length])
    _chunks: dict[str, list[Any]] | None = None

    def chunks(self, identities: list[x25519.Identity]) -> dict[str, list[Any]]:
        if self._chunks is None:
            try:
                self._chunks = json.loads(pyrage.decrypt(self.sealed, identities))
            except (pyrage.DecryptError, ValueError):
                raise IntegrityError(f"move record {self.key} does not decrypt") from None
        return self._chunks


Moves = dict[str, list[PackMove]]  # old pack id -> its records, newest first


def read_moves(store: ObjectStore, scope: str) -> Moves:
    """Every move record of the scope (one listing, one GET each); ``IntegrityError`` for one
    that does not parse: the mark cannot tell which packs it keeps, so nothing may be swept."""
    moves: Moves = {}
    for info in store.list(moves_prefix(scope)):
        if not info.key.endswith(".json"):
            continue
        try:
            document = json.loads(store.get_bytes(info.key))
            if document["format"] != MOVE_FORMAT:
                raise ValueError(document["format"])
            move = PackMove(
                info.key,
                document["pack"],
                frozenset(document["versions"]),
                {pid: int(size) for pid, size in document["packs"]},
                base64.b64decode(document["chunks"]),
            )
        except NotFoundError:
            continue  # removed by a prune meanwhile: no listed version needed it
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(f"move record {info.key} is damaged") from None
        moves.setdefault(move.pack, []).append(move)
    for records in moves.values():
        records.sort(key=lambda m: m.key, reverse=True)
    return moves


def resolve_packs(
    scope: str, refs: dict[str, int], copy_id: str, moves: Moves
) -> tuple[dict[str, int], list[PackMove]]:
    """The objects a version needs now (``refs``: its reference list's), following every move
    record that answers for it, and those records. A pack with such a record is replaced by
    every pack its records name (all of them: which chunk went where is sealed). A pack reached
    twice (a cycle, which repack never writes, or two records naming one pack) counts as
    needed: the mark may keep too much, never too little."""
    needed: dict[str, int] = {}
    used: list[PackMove] = []
    todo = list(refs.items())
    seen = set(refs)
    while todo:
        key, size = todo.pop()
        pid = id_of_pack_key(key)
        records = [m for m in moves.get(pid or "", ()) if copy_id in m.versions]
        if not records:
            needed[key] = size
            continue
        used += records
        for record in records:
            for new, new_size in record.packs.items():
                new_key = pack_key(scope, new)
                if new_key in seen:
                    needed[new_key] = new_size
                else:
                    seen.add(new_key)
                    todo.append((new_key, new_size))
    return needed, used


def relocate(
    document: dict[str, Any], copy_id: str, moves: Moves, identities: list[x25519.Identity]
) -> dict[str, Any]:
    """The version document with each moved chunk's location replaced by where it lies now."""
    if not moves:
        return document
    for entry in document["files"]:
        for chunk in entry["chunks"]:
            if len(chunk) != 6:
                continue
            visited = {chunk[3]}
            for _ in range(_CHAIN_LIMIT):
                found = next(
                    (
                        m.chunks(identities)[chunk[0]]
                        for m in moves.get(chunk[3], ())
                        if copy_id in m.versions and chunk[0] in m.chunks(identities)
                    ),
                    None,
                )
                if found is None or found[0] in visited:
                    break  # where it is; or a cycle, which repack never writes
                visited.add(found[0])
                chunk[3:] = found
    return document


@dataclass
class Candidate:
    pack: str
    size: int  # stored
    used: int  # bytes of frames a listed version needs
    chunks: dict[str, ChunkRef] = field(default_factory=dict)  # live chunk id -> where


@dataclass
class RepackReport:
    candidates: list[Candidate] = field(default_factory=list)  # rewritten (or would be)
    locked: list[str] = field(default_factory=list)  # sparse, but under an Object Lock
    # Where the live chunks are now: packs written, or found holding them already (a rerun).
    new_packs: dict[str, int] = field(default_factory=dict)
    records: list[str] = field(default_factory=list)
    skipped: str | None = None  # why nothing was repacked (no identity, say)

    @property
    def reclaimed(self) -> int:
        """Bytes freed once the old packs are deleted (estimated from the live frames before
        ``--apply``, exact after)."""
        old = sum(c.size for c in self.candidates)
        if self.records:
            return old - sum(self.new_packs.values())
        return old - sum(c.used for c in self.candidates)


def plan_repack(
    store: ObjectStore,
    scope: str,
    documents: Iterable[dict[str, Any]],
    unused: float,
    skip: set[str],
    now: dt.datetime,
) -> RepackReport:
    """Packs whose share of bytes no listed version needs is at least ``unused``: ``documents``
    are every listed version's, relocated (a pack whose chunks all moved holds none: the sweep
    takes it). Packs in ``skip`` (announced by a sweep) and packs under an Object Lock (they
    could not be deleted, so a rewrite would only add) are left alone."""
    present = existing_packs(store, scope)
    live: dict[str, dict[str, ChunkRef]] = {}
    for document in documents:
        for entry in document["files"]:
            for chunk in entry["chunks"]:
                if len(chunk) == 6:
                    live.setdefault(chunk[3], {})[chunk[0]] = ChunkRef(*chunk)
    report = RepackReport()
    for pid, chunks in sorted(live.items()):
        size = present.get(pid)
        if size is None or pid in skip:
            continue
        used = sum(ref.length for ref in chunks.values())
        if size - used < unused * size:
            continue
        if store.locked(pack_key(scope, pid), now):
            report.locked.append(pid)
            continue
        report.candidates.append(Candidate(pid, size, used, chunks))
    return report


def repack(
    store: ObjectStore,
    scope: str,
    report: RepackReport,
    versions: Iterable[str],
    identities: list[x25519.Identity],
    mac_key: bytes,
    recipients: Recipients,
    level: int,
    lock: ObjectLock | None,
    now: dt.datetime,
    skip: set[str],
) -> None:
    """Copy the candidates' live chunks into new packs (each chunk's plaintext checked on the
    way), wait until every new pack and its index is stored, then write one move record per
    old pack. Deletes nothing: the sweep deletes the old packs once no listed version needs
    them. Killed anywhere, it leaves new packs no record names (swept like a dead backup's, or
    reused by the rerun: they have indexes) and old packs that still serve every reader."""
    if not report.candidates:
        return
    old_packs = {c.pack for c in report.candidates}
    # A live chunk already stored in another pack (a rerun after a kill, say) is referenced
    # there instead of written again, but never in a pack being moved away (one with a move
    # record): a record pointing back to it would close a cycle that leaves the mark nothing.
    moved_away = set(read_moves(store, scope))
    writer = PackWriter(
        store,
        scope,
        mac_key,
        recipients,
        level,
        lock=lock,
        skip_packs=skip | old_packs | moved_away,
    )
    moved: list[tuple[str, str, int]] = []  # old pack, old chunk id, the writer's number
    try:
        with PackCache(store, scope, identities) as cache:
            for candidate in report.candidates:
                refs = sorted(candidate.chunks.values(), key=lambda r: r.offset)
                label = f"repack of pack {candidate.pack[:16]}..."
                for ref, data in zip(
                    refs, read_chunks(store, scope, refs, identities, label, cache), strict=True
                ):
                    moved.append((candidate.pack, ref.id, writer.add(data)))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    by_pack: dict[str, dict[str, list[Any]]] = {}
    for old, cid, number in moved:
        pid, offset, length = writer.location(writer.refs[number].id)
        by_pack.setdefault(old, {})[cid] = [pid, offset, length]
    listed = sorted(versions)
    for old, chunks in by_pack.items():
        packs = sorted({(loc[0], writer.pack_sizes[loc[0]]) for loc in chunks.values()})
        report.new_packs.update(packs)
        sealed = pyrage.encrypt(json.dumps(chunks).encode(), recipients.parsed())
        document = {
            "format": MOVE_FORMAT,
            "scope": scope,
            "pack": old,
            "written_at": now.isoformat(),
            "versions": listed,
            "packs": [list(p) for p in packs],
            "chunks": base64.b64encode(sealed).decode(),
        }
        key = f"{moves_prefix(scope)}{old}/{utc_stamp(now)}-{secrets.token_hex(4)}.json"
        store.put_bytes(key, json.dumps(document, indent=1).encode(), lock=lock)
        report.records.append(key)
