"""WORM proven per copy: each copy's Object Lock as the store reports it now, not as the manifest
recorded it when the copy was written."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass

from spark_backup.engine.cadence import utcnow
from spark_backup.engine.drill_record import verified_copies
from spark_backup.engine.manifest import Manifest, manifest_key
from spark_backup.engine.stores.base import ObjectLock, original_version, stacked_on
from spark_backup.errors import NotFoundError
from spark_backup.service.runtime import PlanRuntime
from spark_backup.sources.base import CopyRef


@dataclass(frozen=True)
class LockStatus:
    """The retention the store holds on a copy's data object and manifest."""

    copy_id: str
    # What the store's policy asks for (``object_lock.mode``).
    expected_mode: str
    mode: str | None
    # The earlier of the data object's and the manifest's retain-until dates.
    retain_until: str | None
    # Whether both objects are under retention now (a lock ends at its date, as recorded).
    active: bool
    # Lost or weakened protection: a missing lock, another mode, an earlier date than recorded.
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "retain_until": self.retain_until,
            "active": self.active,
            "ok": self.ok,
            "problems": list(self.problems),
        }


class LockOperations(PlanRuntime):
    def lock_status(self, ref: CopyRef, now: dt.datetime | None = None) -> LockStatus | None:
        """Read back the copy's Object Lock; None for a store without Object Lock. A problem is
        a missing lock, another mode than the store's policy, or a retain-until date earlier
        than the one the manifest recorded; a lock that ended at its recorded date is none."""
        policy = ref.store.default_lock
        if policy is None:
            return None
        now = now or utcnow()
        manifest = ref.manifest
        problems: list[str] = []
        locks: list[ObjectLock] = []
        for what, key, recorded_version in (
            ("data", manifest.data_key, manifest.data_version),
            ("manifest", manifest_key(manifest.source, manifest.id), None),
        ):
            try:
                version = self._tampering(ref, what, key, recorded_version, problems)
                lock = ref.store.lock_of(key, version)
            except NotFoundError:
                problems.append(f"{what} object missing")
                continue
            if lock is None:
                problems.append(f"{what} object has no retention")
                continue
            locks.append(lock)
            if lock.mode != policy.mode:
                problems.append(f"{what} object is locked in {lock.mode} mode, not {policy.mode}")
            recorded = (manifest.lock or {}).get("retain_until")
            # S3 keeps retention dates to the second.
            if recorded and lock.retain_until < dt.datetime.fromisoformat(recorded).replace(
                microsecond=0
            ):
                problems.append(
                    f"{what} object is retained until {lock.retain_until.isoformat()}, earlier "
                    f"than the {recorded} the manifest recorded"
                )
        earliest = min(locks, key=lambda lock: lock.retain_until, default=None)
        return LockStatus(
            manifest.id,
            policy.mode,
            earliest.mode if earliest else None,
            earliest.retain_until.isoformat() if earliest else None,
            len(locks) == 2 and all(lock.active(now) for lock in locks),
            tuple(problems),
        )

    @staticmethod
    def _tampering(
        ref: CopyRef, what: str, key: str, recorded: str | None, problems: list[str]
    ) -> str | None:
        """On a versioned store: add what was stacked on the version the backup wrote (the
        recorded one, else the first) to ``problems``, and return that version's id."""
        if not ref.store.versioned:
            return recorded
        history = ref.store.versions(key).get(key, [])
        original = original_version(history)
        version = recorded or (original.version_id if original else None)
        if version is None:
            raise NotFoundError(f"{what} object {key} has no version")
        problems += [
            f"tampering: {problem}"
            for problem in stacked_on(history, version, f"{what} object {key}")
        ]
        return version

    def worm_status(
        self, source_name: str, artifact: str | None = None, now: dt.datetime | None = None
    ) -> list[tuple[LockStatus, bool]]:
        """Each copy of the source (of one artifact) on a WORM store, read back, with whether
        retention keeps it now: a kept copy must still be locked, so the lock must cover as long
        as its tier keeps it."""
        from spark_backup.engine.retention import apply_retention  # not for ``list``

        now = now or utcnow()
        source = self.plan.source(source_name)
        refs = self.copies(source_name, artifact)
        verified = verified_copies(self.store_for(source), source.name)
        series: dict[str, list[Manifest]] = defaultdict(list)
        for ref in refs:
            series[ref.manifest.part].append(ref.manifest)
        kept = {
            copy_id
            for copies in series.values()
            for copy_id in apply_retention(copies, self.retention(source), verified).keep
        }
        found = []
        for ref in refs:
            status = self.lock_status(ref, now)
            if status is not None:
                found.append((status, ref.manifest.id in kept))
        return found
