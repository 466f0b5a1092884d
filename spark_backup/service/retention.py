"""Retention and prune: expire what no rule keeps, clean up what interrupted writes left."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from pyrage import x25519

from spark_backup.engine import catalog
from spark_backup.engine.cadence import utcnow
from spark_backup.engine.catalog import is_index_key
from spark_backup.engine.drill_record import drill_keys_of, verified_copies
from spark_backup.engine.manifest import (
    Manifest,
    copy_id_of_manifest_key,
    is_copy_key,
    manifest_key,
)
from spark_backup.engine.replication.records import record_keys_of
from spark_backup.engine.retention import TierStatus, apply_retention, tier_status
from spark_backup.engine.staging import stale_staging
from spark_backup.engine.stores.base import ObjectStore
from spark_backup.errors import CryptoError, SecretError
from spark_backup.service.journal import JournalOperations
from spark_backup.sources import registry
from spark_backup.sources.base import ContinuousLog, SharedObjects


@dataclass
class PruneReport:
    dry_run: bool
    kept: dict[str, list[str]] = field(default_factory=dict)
    expired: list[str] = field(default_factory=list)
    locked: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    incomplete_uploads: list[str] = field(default_factory=list)
    # Log objects (WAL, oplog slices) no kept base copy needs.
    log_expired: list[str] = field(default_factory=list)
    # Manifests that cannot be read: their copies are kept and reported, never deleted.
    damaged: list[str] = field(default_factory=list)
    # Shared objects (chunks of the blob layer) no committed copy needs any more.
    shared_expired: list[str] = field(default_factory=list)
    # Staging folders of restores that were killed (plaintext, never published).
    stale_restore_staging: list[str] = field(default_factory=list)
    # Packs whose live chunks were (or would be) rewritten into new packs: source, pack,
    # stored size, bytes still needed; the old pack goes with the sweep once nothing needs it.
    repacked: list[dict[str, Any]] = field(default_factory=list)
    repack_new_packs: list[str] = field(default_factory=list)
    # Bytes the old packs free once deleted, less the new packs' (estimated in a dry run).
    repack_reclaimed_bytes: int = 0
    repack_locked: list[str] = field(default_factory=list)  # sparse packs under Object Lock
    repack_skipped: list[str] = field(default_factory=list)  # why a source was not repacked


def owned_by_spark_backup(key: str) -> bool:
    """Keys spark-backup writes: copies, index segments, and every kind's log objects. Prune never touches
    any other object in a shared bucket or folder."""
    return (
        is_copy_key(key)
        or is_index_key(key)
        or any(
            kind.owns_key(key)
            for kind in registry.kinds().values()
            if isinstance(kind, ContinuousLog)
        )
        or any(
            kind.owns_shared_key(key)
            for kind in registry.kinds().values()
            if isinstance(kind, SharedObjects)
        )
    )


def _delete_drill_records(store: ObjectStore, source: str, copy_id: str, now: dt.datetime) -> None:
    """A deleted copy's drill and replica records go with it (under a lock they stay until it
    ends); its replicas stay where they are."""
    for record in [*drill_keys_of(store, source, copy_id), *record_keys_of(store, source, copy_id)]:
        if not store.locked(record, now):
            store.delete(record)


class RetentionOperations(JournalOperations):
    def prune(
        self,
        dry_run: bool = True,
        now: dt.datetime | None = None,
        identity_file: str | None = None,
    ) -> PruneReport:
        """Expire copies no retention rule keeps, remove orphaned data and stale uploads,
        repack shared objects mostly unneeded (with an identity: given, or the plan's).

        A copy is deleted manifest first (it disappears from listings at once), then data; a
        copy or object under an active Object Lock is never touched.
        """
        report = PruneReport(dry_run=dry_run)
        now = now or utcnow()
        identities: list[x25519.Identity] | None = None
        for source in self.plan.sources:
            store = self.store_for(source)
            rule = self.retention(source)
            refs, damaged = self.listing(source.name)
            report.damaged += [f"{d.uri}: {d.error}" for d in damaged]
            # Each part (one database's dumps, the base backups, ...) is its own series. A
            # log's slices are no series: they go with the base copies (the log's expire).
            kind = self.kind_of(source)
            with_base = {a.name for a in self.artifacts(source) if a.expires_with_base}
            series: dict[str, list[Manifest]] = defaultdict(list)
            for ref in refs:
                if kind.artifact_of(ref.manifest) not in with_base:
                    series[ref.manifest.part].append(ref.manifest)
            verified = verified_copies(store, source.name)
            expired: list[Manifest] = []
            kept: dict[str, list[str]] = {}
            for copies in series.values():
                decision = apply_retention(copies, rule, verified)
                kept.update(decision.keep)
                expired += decision.expire
            report.kept.update(kept)
            deleted, locked = [], []
            for manifest in expired:
                key = manifest_key(manifest.source, manifest.id)
                if store.locked(key, now) or store.locked(manifest.data_key, now):
                    locked.append(manifest.id)
                    continue
                deleted.append(manifest.id)
                if not dry_run:
                    store.delete(key)
                    store.delete(manifest.data_key)
                    _delete_drill_records(store, manifest.source, manifest.id, now)
            report.expired += deleted
            report.locked += locked
            if not dry_run:
                # The evidence that retention ran, and why each copy stayed or went.
                self.journal_event(
                    "prune",
                    source=source.name,
                    expired=deleted,
                    locked=locked,
                    kept=kept,
                    rule={"daily": rule.daily, "weekly": rule.weekly, "monthly": rule.monthly},
                )
            copies_gone = bool(expired)
            if isinstance(kind, ContinuousLog) and kind.log_enabled(source):
                gone = set(report.expired)
                kept_bases = [
                    ref.manifest
                    for ref in refs
                    if kind.artifact_of(ref.manifest) == kind.base_artifact
                    and ref.manifest.id not in gone
                ]
                log_gone = kind.expire(self, source, kept_bases, now, dry_run)
                report.log_expired += log_gone
                # A log read in slices keeps them as copies, which the index lists and drills
                # may have recorded.
                copies_gone = copies_gone or bool(log_gone and kind.log_artifact)
                for gone_key in log_gone if not dry_run else ():
                    slice_id = copy_id_of_manifest_key(gone_key)
                    if slice_id is not None:
                        _delete_drill_records(store, source.name, slice_id, now)
            if copies_gone and not dry_run:
                self.update_index(store, source.name)
            if isinstance(kind, SharedObjects):
                unused = self.plan.defaults.repack_unused
                if unused is not None and identities is None:
                    identities = self._repack_identities(identity_file, report)
                if unused is not None and identities:
                    # Before the sweep, which then finds the old packs unreferenced.
                    expiring = frozenset(deleted)
                    self._repack(kind, source, identities, unused, now, dry_run, expiring, report)
                # After the expired copies are gone, so that their objects are unreferenced.
                report.shared_expired += kind.collect(
                    self, source, now, self.plan.defaults.orphan_grace, dry_run
                )
        grace = self.plan.defaults.orphan_grace
        for store in self.all_stores():
            for orphan in catalog.find_orphans(store, grace, now):
                if store.locked(orphan.key, now):
                    continue
                report.orphans.append(f"{store.name}:{orphan.key}")
                if not dry_run:
                    store.delete(orphan.key)
            report.incomplete_uploads.extend(
                f"{store.name}:{key}"
                for key in store.cleanup_incomplete(grace, owned_by_spark_backup, apply=not dry_run)
            )
        report.stale_restore_staging = stale_staging(remove=not dry_run)
        return report

    def _repack_identities(
        self, identity_file: str | None, report: PruneReport
    ) -> list[x25519.Identity]:
        """The identities a repack reads with; none (and the reason reported) when neither
        given nor configured, or the plan's secret cannot be read: prune then sweeps whole
        packs only, as it did before repacking."""
        try:
            return self.identities(identity_file)
        except (CryptoError, SecretError) as exc:
            if identity_file:
                raise
            report.repack_skipped.append(f"no repack: {exc}")
            return []

    def _repack(
        self,
        kind: SharedObjects,
        source,
        identities: list[x25519.Identity],
        unused: float,
        now: dt.datetime,
        dry_run: bool,
        expiring: frozenset[str],
        report: PruneReport,
    ) -> None:
        result = kind.repack(self, source, identities, unused, now, dry_run, expiring)
        if result is None:
            return
        if result.skipped:
            report.repack_skipped.append(f"{source.name}: {result.skipped}")
        report.repacked += [
            {"source": source.name, "pack": c.pack, "size": c.size, "used": c.used}
            for c in result.candidates
        ]
        report.repack_new_packs += [f"{source.name}:{pid}" for pid in result.new_packs]
        report.repack_locked += [f"{source.name}:{pid}" for pid in result.locked]
        report.repack_reclaimed_bytes += result.reclaimed
        if not dry_run and result.candidates:
            self.journal_event(
                "repack",
                source=source.name,
                packs=[c.pack for c in result.candidates],
                new_packs=sorted(result.new_packs),
                reclaimed_bytes=result.reclaimed,
            )

    def retention_status(
        self, source_name: str, artifact: str | None = None, now: dt.datetime | None = None
    ) -> dict[str, list[TierStatus]]:
        """Per part of the source's copies (of one artifact): each tier against the policy."""
        source = self.plan.source(source_name)
        series: dict[str, list[Manifest]] = defaultdict(list)
        for ref in self.copies(source_name, artifact):
            series[ref.manifest.part].append(ref.manifest)
        rule = self.retention(source)
        return {
            part: tier_status(copies, rule, now or utcnow())
            for part, copies in sorted(series.items())
        }
