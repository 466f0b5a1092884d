"""Point-in-time restore: the newest dump consistent before the target time, restored into new
databases, then its own ``oplog.bson`` and the oplog slices that continue it replayed in order
up to the target time (``apply.py``). The report names the exact oplog timestamp reached.

The slices must form an unbroken chain from the dump's ``consistent_at``: a gap before the
target stops the restore with the last reachable point, and ``latest`` means the end of the
chain, never an early stop nobody chose.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from spark_backup.engine.manifest import Manifest
from spark_backup.errors import IntegrityError, NotFoundError
from spark_backup.sources.mongodb import oplog
from spark_backup.sources.mongodb.slices import slice_order


@dataclass
class MongoPitrReport:
    source: str
    base_copy_id: str
    target_time: str
    databases: dict[str, str]
    slices: list[str] = field(default_factory=list)
    entries_applied: int = 0
    # The newest oplog timestamp replayed (the dump's consistent point if nothing followed).
    reached_ts: dict[str, int] | None = None
    reached_time: str | None = None
    documents: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    ok: bool = False
    error: str | None = None


def ts_limit(target: dt.datetime | None) -> tuple[int, int] | None:
    """The largest oplog timestamp at or before ``target`` (a timestamp's seconds are whole)."""
    if target is None:
        return None
    return int(target.timestamp()), 0xFFFFFFFF


def choose_base(dumps: Sequence[Manifest], target: dt.datetime | None, source: str) -> Manifest:
    limit = ts_limit(target)
    positioned = [m for m in dumps if m.source_metadata.get("consistent_at")]
    usable = [
        m
        for m in positioned
        if limit is None or oplog.ts_key(m.source_metadata["consistent_at"]) <= limit
    ]
    if not usable:
        what = "a replica-set dump (with an oplog position)" if not positioned else "a dump"
        when = f" consistent at or before {target.isoformat()}" if target else ""
        raise NotFoundError(f"source {source!r} has no {what}{when} to restore from")
    return max(usable, key=lambda m: oplog.ts_key(m.source_metadata["consistent_at"]))


def slices_to_replay(
    base: Manifest, slices: Sequence[Manifest], target: dt.datetime | None, source: str
) -> list[Manifest]:
    """The chain of slices from the dump's consistent point to the target: ``IntegrityError``
    with the last reachable point if a gap (or the end of the chain) comes first."""
    limit = ts_limit(target)
    covered = oplog.ts_key(base.source_metadata["consistent_at"])
    chosen = []
    for manifest in sorted(slices, key=slice_order):
        if slice_order(manifest) <= covered:
            continue
        if limit is not None and covered >= limit:
            break
        after = oplog.ts_key(manifest.source_metadata["after_ts"])
        if after > covered:
            raise IntegrityError(
                f"source {source!r}: the oplog slices have a gap after {_ts(covered)} (slice "
                f"{manifest.id} continues from {_ts(after)}); the last reachable point is "
                f"{_ts(covered)}: choose --to-time at or before it"
            )
        chosen.append(manifest)
        covered = slice_order(manifest)
    if limit is not None and covered < limit and target is not None:
        saved_until = max(
            (dt.datetime.fromisoformat(m.source_metadata["read_at"]) for m in chosen), default=None
        )
        if saved_until is None or saved_until < target:
            raise IntegrityError(
                f"source {source!r}: the oplog is saved only until {_ts(covered)}"
                f"{f' (read at {saved_until.isoformat()})' if saved_until else ''}; "
                f"{target.isoformat()} is later: choose --to-time at or before it, or 'latest'"
            )
    return chosen


def within(ts: dict[str, int], target: dt.datetime | None) -> bool:
    limit = ts_limit(target)
    return limit is None or oplog.ts_key(ts) <= limit


def _ts(key: tuple[int, int]) -> str:
    when = dt.datetime.fromtimestamp(key[0], dt.UTC).isoformat()
    return f"{key[0]}:{key[1]} ({when})"


def describe(ts: dict[str, int] | None) -> Any:
    return None if ts is None else oplog.ts_time(ts).isoformat()
