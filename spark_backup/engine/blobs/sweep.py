"""Mark and sweep of chunks no committed version needs.

Mark: the union of the reference lists of every committed copy of the scope (the caller reads
them; a list it cannot read stops the sweep, which then deletes nothing). Sweep, in this order:

1. Read every sweep plan (``<scope>/chunk-sweeps/<stamp>-<hex>.json``): when each unreferenced
   chunk was first seen unreferenced, and which chunks were deleted recently.
2. Write a new plan: every chunk unreferenced now (with the time it was first seen so, carried
   over), the chunks about to be deleted, and deletions younger than ``grace``.
3. Delete the chunks that were unreferenced for at least ``grace`` (and whose objects are at
   least that old), never one under an Object Lock.
4. Delete the older plans.

A backup that reuses a chunk named in any plan fails before it commits (``doomed``): so a
chunk is only deleted after it was announced for ``grace`` (longer than any backup), and every
backup running meanwhile either saw the announcement or committed before the mark. A sweep
interrupted anywhere leaves plans that a rerun reads and finishes; it never deletes a chunk
referenced by a committed copy, because it marks before it deletes and announced chunks cannot
gain new references.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from dataclasses import dataclass, field

from spark_backup.engine.blobs.chunks import chunk_key, chunks_prefix, id_of_chunk_key
from spark_backup.engine.manifest import utc_stamp
from spark_backup.engine.stores.base import ObjectStore
from spark_backup.errors import NotFoundError, ObjectLockedError

SWEEP_FORMAT = "spark-backup.chunk-sweep/v1"


def sweeps_prefix(scope: str) -> str:
    return f"{scope}/chunk-sweeps/"


@dataclass
class Plans:
    keys: list[str] = field(default_factory=list)
    unreferenced: dict[str, dt.datetime] = field(default_factory=dict)  # id -> first seen
    deleted: dict[str, dt.datetime] = field(default_factory=dict)

    def doomed(self) -> set[str]:
        return set(self.unreferenced) | set(self.deleted)


def read_plans(store: ObjectStore, scope: str) -> Plans:
    plans = Plans()
    for info in store.list(sweeps_prefix(scope)):
        if not info.key.endswith(".json"):
            continue
        try:
            document = json.loads(store.get_bytes(info.key))
        except NotFoundError:
            continue  # removed by a sweep meanwhile; its successor holds what it held
        except ValueError:
            # Damaged: treat as a plan of unknown content (nothing is deleted on its word, but
            # its key is kept so a backup sees one exists).
            plans.keys.append(info.key)
            continue
        plans.keys.append(info.key)
        for table, into in (("unreferenced", plans.unreferenced), ("deleted", plans.deleted)):
            for cid, when in document.get(table, {}).items():
                moment = dt.datetime.fromisoformat(when)
                into[cid] = min(into.get(cid, moment), moment)
    return plans


def doomed_chunks(store: ObjectStore, scope: str) -> set[str]:
    """Chunks a sweep announced: a backup must not commit a version that reuses one."""
    return read_plans(store, scope).doomed()


@dataclass
class SweepReport:
    unreferenced: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # unreferenced, announced for < grace
    locked: list[str] = field(default_factory=list)
    plan: str | None = None


def sweep(
    store: ObjectStore,
    scope: str,
    referenced: set[str],
    now: dt.datetime,
    grace: dt.timedelta,
    dry_run: bool,
) -> SweepReport:
    """Delete (or with ``dry_run`` list) the chunks of ``scope`` outside ``referenced`` that
    were announced unreferenced at least ``grace`` ago."""
    report = SweepReport()
    present = {
        cid: info.modified
        for info in store.list(chunks_prefix(scope))
        if (cid := id_of_chunk_key(info.key)) is not None
    }
    plans = read_plans(store, scope)
    cutoff = now - grace
    unreferenced: dict[str, dt.datetime] = {}
    due = []
    for cid in sorted(set(present) - referenced):
        first_seen = plans.unreferenced.get(cid, now)
        unreferenced[cid] = first_seen
        report.unreferenced.append(cid)
        if first_seen <= cutoff and present[cid] <= cutoff:
            due.append(cid)
        else:
            report.waiting.append(cid)
    if dry_run:
        report.deleted = due
        return report
    deleted = {cid: when for cid, when in plans.deleted.items() if when > cutoff}
    deleted.update({cid: now for cid in due})
    if unreferenced or deleted:
        document = {
            "format": SWEEP_FORMAT,
            "scope": scope,
            "written_at": now.isoformat(),
            "grace_seconds": int(grace.total_seconds()),
            "unreferenced": {cid: when.isoformat() for cid, when in unreferenced.items()},
            "deleted": {cid: when.isoformat() for cid, when in deleted.items()},
        }
        report.plan = f"{sweeps_prefix(scope)}{utc_stamp(now)}-{secrets.token_hex(4)}.json"
        store.put_bytes(report.plan, json.dumps(document, indent=1).encode())
    for cid in due:
        key = chunk_key(scope, cid)
        if store.locked(key, now):
            report.locked.append(cid)
            continue
        try:
            store.delete(key)
        except ObjectLockedError:
            report.locked.append(cid)
            continue
        report.deleted.append(cid)
    for key in plans.keys:
        store.delete(key)
    return report
