"""Mark and sweep of the packs (and first-release chunk objects) no committed version needs.

The unit is a store object: a pack, deleted only when no kept or locked version needs any chunk
in it (a version's reference list names its packs), or a chunk object of the first release's
layout. Mark: the union of the reference lists of every committed copy of the scope (the
caller reads them; a list it cannot read stops the sweep, which then deletes nothing). Sweep, in
this order:

1. Read every sweep plan (``<scope>/chunk-sweeps/<stamp>-<hex>.json``): when each unreferenced
   object was first seen unreferenced, and which objects were deleted recently.
2. Write a new plan: every object unreferenced now (with the time it was first seen so, carried
   over), the objects about to be deleted, and deletions younger than ``grace``.
3. Delete the objects that were unreferenced for at least ``grace`` (and that are at least that
   old), never one under an Object Lock; a pack's index before the pack, so no index names a
   pack that is gone.
4. Delete the older plans.

A backup that reuses a chunk of an object named in any plan fails before it commits
(``doomed``), and a backup leaves packs a plan names out of the chunks it reuses: so an object
is only deleted after it was announced for ``grace`` (longer than any backup), and every backup
running meanwhile either saw the announcement or committed before the mark. A sweep interrupted
anywhere leaves plans that a rerun reads and finishes; it never deletes an object referenced by
a committed copy, because it marks before it deletes and announced objects cannot gain new
references.

Plans of the first release (``chunk-sweep/v1``) name chunk ids; they are read as the keys of
those chunk objects.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from contextlib import suppress
from dataclasses import dataclass, field

from spark_backup.engine.blobs.chunks import chunk_key, chunks_prefix, id_of_chunk_key
from spark_backup.engine.blobs.packs import id_of_pack_key, index_key, packs_prefix
from spark_backup.engine.manifest import utc_stamp
from spark_backup.engine.stores.base import ObjectStore
from spark_backup.errors import NotFoundError, ObjectLockedError

SWEEP_FORMAT = "spark-backup.chunk-sweep/v2"
SWEEP_FORMAT_CHUNKS = "spark-backup.chunk-sweep/v1"


def sweeps_prefix(scope: str) -> str:
    return f"{scope}/chunk-sweeps/"


@dataclass
class Plans:
    keys: list[str] = field(default_factory=list)
    unreferenced: dict[str, dt.datetime] = field(default_factory=dict)  # object key -> first seen
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
        by_id = document.get("format") == SWEEP_FORMAT_CHUNKS
        for table, into in (("unreferenced", plans.unreferenced), ("deleted", plans.deleted)):
            for name, when in document.get(table, {}).items():
                key = chunk_key(scope, name) if by_id else name
                moment = dt.datetime.fromisoformat(when)
                into[key] = min(into.get(key, moment), moment)
    return plans


def doomed_objects(store: ObjectStore, scope: str) -> set[str]:
    """Keys of objects a sweep announced: a backup must not commit a version that needs one."""
    return read_plans(store, scope).doomed()


def doomed_packs(store: ObjectStore, scope: str) -> set[str]:
    return {pid for key in doomed_objects(store, scope) if (pid := id_of_pack_key(key))}


def swept_objects(store: ObjectStore, scope: str) -> dict[str, dt.datetime]:
    """Every pack and first-release chunk object of the scope, with its time of writing."""
    present = {}
    for prefix, named in (
        (packs_prefix(scope), id_of_pack_key),
        (chunks_prefix(scope), id_of_chunk_key),
    ):
        for info in store.list(prefix):
            if named(info.key) is not None:
                present[info.key] = info.modified
    return present


@dataclass
class SweepReport:
    unreferenced: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # unreferenced, announced for < grace
    locked: list[str] = field(default_factory=list)
    plan: str | None = None


def _delete(store: ObjectStore, scope: str, key: str) -> None:
    if (pid := id_of_pack_key(key)) is not None:
        with suppress(NotFoundError):
            store.delete(index_key(scope, pid))
    store.delete(key)


def sweep(
    store: ObjectStore,
    scope: str,
    referenced: set[str],
    now: dt.datetime,
    grace: dt.timedelta,
    dry_run: bool,
) -> SweepReport:
    """Delete (or with ``dry_run`` list) the packs and chunk objects of ``scope`` whose keys
    are not in ``referenced`` and that were announced unreferenced at least ``grace`` ago."""
    report = SweepReport()
    present = swept_objects(store, scope)
    plans = read_plans(store, scope)
    cutoff = now - grace
    unreferenced: dict[str, dt.datetime] = {}
    due = []
    for key in sorted(set(present) - referenced):
        first_seen = plans.unreferenced.get(key, now)
        unreferenced[key] = first_seen
        report.unreferenced.append(key)
        if first_seen <= cutoff and present[key] <= cutoff:
            due.append(key)
        else:
            report.waiting.append(key)
    if dry_run:
        report.deleted = due
        return report
    deleted = {key: when for key, when in plans.deleted.items() if when > cutoff}
    deleted.update({key: now for key in due})
    if unreferenced or deleted:
        document = {
            "format": SWEEP_FORMAT,
            "scope": scope,
            "written_at": now.isoformat(),
            "grace_seconds": int(grace.total_seconds()),
            "unreferenced": {key: when.isoformat() for key, when in unreferenced.items()},
            "deleted": {key: when.isoformat() for key, when in deleted.items()},
        }
        report.plan = f"{sweeps_prefix(scope)}{utc_stamp(now)}-{secrets.token_hex(4)}.json"
        store.put_bytes(report.plan, json.dumps(document, indent=1).encode())
    for key in due:
        if store.locked(key, now):
            report.locked.append(key)
            continue
        try:
            _delete(store, scope, key)
        except ObjectLockedError:
            report.locked.append(key)
            continue
        except NotFoundError:
            pass  # an interrupted sweep deleted it already
        report.deleted.append(key)
    for key in plans.keys:
        store.delete(key)
    return report
