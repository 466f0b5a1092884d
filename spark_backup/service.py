"""The operations a plan supports (backup, list, verify, restore, prune), shared by the CLI and the
Dagster layer so that both do exactly the same thing. No Dagster imports here."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyrage import x25519

from spark_backup.engine import catalog
from spark_backup.engine.crypto import Recipients, load_identities, read_recipients_file
from spark_backup.engine.manifest import COPY_ID_RE, Manifest, is_copy_key, manifest_key
from spark_backup.engine.partitions import check_partition_key, partition_key_for
from spark_backup.engine.pipeline import (
    CompressionSettings,
    Verification,
    open_copy,
    utcnow,
    verify_copy,
    write_copy,
)
from spark_backup.engine.retention import RetentionRule, apply_retention
from spark_backup.engine.stores import ObjectStore, open_store
from spark_backup.engine.streams import ProgressCallback
from spark_backup.errors import IntegrityError, NotFoundError
from spark_backup.plan import LoadedPlan, SourceConfig, load_plan
from spark_backup.sources import kind_module


@dataclass(frozen=True)
class CopyRef:
    store: ObjectStore
    manifest: Manifest


@dataclass
class VerifyOutcome:
    copy_id: str
    source: str
    partition: str
    ok: bool
    deep: bool
    error: str | None = None
    bytes_read: int = 0
    seconds: float = 0.0


@dataclass
class PruneReport:
    dry_run: bool
    kept: dict[str, list[str]] = field(default_factory=dict)
    expired: list[str] = field(default_factory=list)
    locked: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    incomplete_uploads: list[str] = field(default_factory=list)


class BackupService:
    def __init__(self, loaded: LoadedPlan):
        self.loaded = loaded
        self.plan = loaded.plan
        self._stores: dict[str, ObjectStore] = {}

    @classmethod
    def from_path(cls, path: str | Path | None = None) -> BackupService:
        return cls(load_plan(path))

    # --- plan views --------------------------------------------------------------------------

    def store(self, name: str) -> ObjectStore:
        if name not in self._stores:
            config = next(s for s in self.plan.stores if s.name == name)
            self._stores[name] = open_store(config, self.loaded)
        return self._stores[name]

    def store_for(self, source: SourceConfig) -> ObjectStore:
        return self.store(self.plan.store_for(source).name)

    def all_stores(self) -> list[ObjectStore]:
        return [self.store(s.name) for s in self.plan.stores]

    def recipients(self) -> Recipients:
        encryption = self.plan.encryption
        keys = list(encryption.recipients)
        for path in encryption.recipients_files:
            keys.extend(read_recipients_file(self.loaded.resolve(path)))
        return Recipients.from_keys(keys, f"{self.loaded.path}: encryption")

    def identities(self, identity_file: str | Path | None = None) -> list[x25519.Identity]:
        plan_file = self.plan.encryption.identity_file
        return load_identities(identity_file, self.loaded.resolve(plan_file) if plan_file else None)

    def current_partition(self, source: SourceConfig, now: dt.datetime | None = None) -> str:
        return partition_key_for(source.cadence, now or utcnow())

    # --- operations --------------------------------------------------------------------------

    def backup(
        self,
        source_name: str,
        partition: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> Manifest:
        source = self.plan.source(source_name)
        if partition is not None:
            check_partition_key(source.cadence, partition, utcnow())
        compression = self.plan.compression_for(source)
        store = self.store_for(source)
        store.check()  # an unreachable store or rejected credentials: say so before reading
        return write_copy(
            store,
            kind_module(source.kind).reader_for(source, self.loaded),
            source_name=source.name,
            partition=partition or self.current_partition(source),
            recipients=self.recipients(),
            compression=CompressionSettings(compression.level, compression.threads),
            progress=progress,
        )

    def copies(self, source_name: str | None = None) -> list[CopyRef]:
        """Committed copies of one source (in its store) or of all sources, oldest first."""
        if source_name:
            source = self.plan.source(source_name)
            store = self.store_for(source)
            return [CopyRef(store, m) for m in catalog.list_copies(store, source.name)]
        refs = [
            CopyRef(store, m) for store in self.all_stores() for m in catalog.list_copies(store)
        ]
        return sorted(refs, key=lambda r: (r.manifest.started_at, r.manifest.id))

    def find(self, copy_id: str) -> CopyRef:
        store, manifest = catalog.find_copy(self.all_stores(), copy_id)
        return CopyRef(store, manifest)

    def select(self, selector: str | None) -> list[CopyRef]:
        """Copies named by a source name, a copy id, or (None) every copy."""
        if selector is None:
            return self.copies()
        if any(s.name == selector for s in self.plan.sources):
            return self.copies(selector)
        if not COPY_ID_RE.match(selector):
            raise NotFoundError(
                f"{selector!r} is neither a source in the plan "
                f"({', '.join(s.name for s in self.plan.sources)}) nor a copy id"
            )
        return [self.find(selector)]

    def verify(
        self,
        ref: CopyRef,
        identities: list[x25519.Identity] | None = None,
        progress: ProgressCallback | None = None,
    ) -> VerifyOutcome:
        manifest = ref.manifest
        outcome = VerifyOutcome(
            manifest.id, manifest.source, manifest.partition, ok=False, deep=bool(identities)
        )
        try:
            if identities:
                result = self._verify_deep(ref, identities, progress)
            else:
                result = verify_copy(ref.store, manifest, progress)
        except (IntegrityError, NotFoundError) as exc:
            # The copy is damaged or its data is gone. A wrong key or an unreachable store is
            # not a verdict on the copy: those propagate with their own exit codes.
            outcome.error = str(exc)
            return outcome
        outcome.ok = True
        outcome.bytes_read = result.bytes_read
        outcome.seconds = result.seconds
        return outcome

    def _verify_deep(
        self, ref: CopyRef, identities: list[x25519.Identity], progress: ProgressCallback | None
    ) -> Verification:
        started = utcnow()
        module = kind_module(ref.manifest.kind)
        with open_copy(ref.store, ref.manifest, identities, progress) as plain:
            module.check_plaintext(plain, ref.manifest)
        seconds = (utcnow() - started).total_seconds()
        # open_copy compared the bytes it read with the manifest's count, so this is what it read.
        return Verification(ref.manifest.id, True, ref.manifest.stored.bytes, seconds)

    def restore(
        self,
        copy_id: str,
        target: Path,
        *,
        identity_file: str | Path | None = None,
        overwrite: bool = False,
        skip_unsafe: bool = False,
        progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        ref = self.find(copy_id)
        identities = self.identities(identity_file)
        started = utcnow()
        summary = kind_module(ref.manifest.kind).restore_copy(
            ref.store,
            ref.manifest,
            identities,
            target,
            overwrite=overwrite,
            skip_unsafe=skip_unsafe,
            progress=progress,
        )
        return {
            "copy_id": copy_id,
            "source": ref.manifest.source,
            "partition": ref.manifest.partition,
            "seconds": round((utcnow() - started).total_seconds(), 3),
            **summary,
        }

    def prune(self, dry_run: bool = True, now: dt.datetime | None = None) -> PruneReport:
        """Expire copies no retention rule keeps, remove orphaned data and stale uploads.

        A copy is deleted manifest first (it disappears from listings at once), then data; a
        copy or object under an active Object Lock is never touched.
        """
        report = PruneReport(dry_run=dry_run)
        now = now or utcnow()
        for source in self.plan.sources:
            store = self.store_for(source)
            retention = self.plan.retention_for(source)
            decision = apply_retention(
                catalog.list_copies(store, source.name),
                RetentionRule(retention.daily, retention.weekly, retention.monthly),
            )
            report.kept.update(decision.keep)
            for manifest in decision.expire:
                key = manifest_key(manifest.source, manifest.id)
                if _locked(store, key, now) or _locked(store, manifest.data_key, now):
                    report.locked.append(manifest.id)
                    continue
                report.expired.append(manifest.id)
                if not dry_run:
                    store.delete(key)
                    store.delete(manifest.data_key)
        grace = self.plan.defaults.orphan_grace
        for store in self.all_stores():
            for orphan in catalog.find_orphans(store, grace, now):
                if _locked(store, orphan.key, now):
                    continue
                report.orphans.append(f"{store.name}:{orphan.key}")
                if not dry_run:
                    store.delete(orphan.key)
            if not dry_run:
                report.incomplete_uploads.extend(
                    f"{store.name}:{key}" for key in store.cleanup_incomplete(grace, is_copy_key)
                )
        return report

    def freshness(self, source_name: str, now: dt.datetime | None = None) -> Freshness:
        source = self.plan.source(source_name)
        newest = catalog.latest_copy(m.manifest for m in self.copies(source.name))
        return Freshness(
            source=source.name,
            max_age=self.plan.max_age_for(source),
            newest=newest,
            now=now or utcnow(),
        )


@dataclass(frozen=True)
class Freshness:
    """How old the newest committed copy of a source is, against its allowed maximum age."""

    source: str
    max_age: dt.timedelta
    newest: Manifest | None
    now: dt.datetime

    @property
    def age(self) -> dt.timedelta | None:
        return self.now - self.newest.finished if self.newest else None

    @property
    def ok(self) -> bool:
        return self.age is not None and self.age <= self.max_age


def _locked(store: ObjectStore, key: str, now: dt.datetime) -> bool:
    try:
        lock = store.lock_of(key)
    except NotFoundError:
        return False
    return bool(lock and lock.active(now))
