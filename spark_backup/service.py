"""The operations a plan supports (backup, list, verify, restore, prune), shared by the CLI and the
Dagster layer so that both do exactly the same thing. No Dagster imports here."""

from __future__ import annotations

import datetime as dt
import os
import shlex
import shutil
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
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
from spark_backup.errors import (
    IntegrityError,
    NotFoundError,
    SourceError,
    SparkBackupError,
    UsageError,
)
from spark_backup.plan import LoadedPlan, PostgresSource, SourceConfig, load_plan
from spark_backup.sources import kind_module
from spark_backup.sources.artifacts import Artifact
from spark_backup.sources.postgres import KIND as KIND_POSTGRES
from spark_backup.sources.postgres import dump as pg_dump_restore
from spark_backup.sources.postgres import pitr as recovery
from spark_backup.sources.postgres.basebackup import BASE_PART, lsn_value, segment_of
from spark_backup.sources.postgres.server import (
    PostgresServer,
    ServerArchiveState,
    server_archive_state,
)
from spark_backup.sources.postgres.server import (
    apply_settings as pg_apply_settings,
)
from spark_backup.sources.postgres.wal import (
    ArchivedWal,
    archived_wal,
    expendable_wal,
    fetch_wal,
    is_wal_key,
    newest_segment,
    push_wal,
)

WAL_FETCH_WORKERS = 4


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
    wal_expired: list[str] = field(default_factory=list)


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

    def artifacts(self, source: SourceConfig) -> list[Artifact]:
        return kind_module(source.kind).artifacts(source, self.plan)

    def artifact(self, source: SourceConfig, name: str | None = None) -> Artifact:
        """One of the source's artifacts by name; its primary one if ``name`` is None."""
        found = self.artifacts(source)
        for artifact in found:
            if artifact.name == name or (name is None and artifact.primary):
                return artifact
        raise UsageError(
            f"source {source.name!r} has no artifact {name!r} "
            f"(it has: {', '.join(a.name for a in found)})"
        )

    def _compression(self, source: SourceConfig) -> CompressionSettings:
        compression = self.plan.compression_for(source)
        return CompressionSettings(compression.level, compression.threads)

    def current_partition(self, artifact: Artifact, now: dt.datetime | None = None) -> str:
        return partition_key_for(artifact.cadence, now or utcnow())

    # --- operations --------------------------------------------------------------------------

    def backup(
        self,
        source_name: str,
        partition: str | None = None,
        progress: ProgressCallback | None = None,
        artifact: str | None = None,
    ) -> list[Manifest]:
        """Back up one artifact of a source (its primary one by default) as new copies, one per
        stream the kind makes (one per database for a PostgreSQL dump). A failing stream does
        not stop the others; the first failure is raised once all were tried."""
        source = self.plan.source(source_name)
        chosen = self.artifact(source, artifact)
        if partition is not None:
            check_partition_key(chosen.cadence, partition, utcnow())
        store = self.store_for(source)
        store.check()  # an unreachable store or rejected credentials: say so before reading
        readers = kind_module(source.kind).readers_for(source, self.loaded, chosen.name)
        # One partition for the whole run, even one that crosses midnight.
        partition = partition or self.current_partition(chosen)
        recipients, compression = self.recipients(), self._compression(source)
        manifests, failures = [], []
        for reader in readers:
            try:
                manifests.append(
                    write_copy(
                        store,
                        reader,
                        source_name=source.name,
                        partition=partition,
                        recipients=recipients,
                        compression=compression,
                        progress=progress,
                    )
                )
            except SparkBackupError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]
        return manifests

    def copies(self, source_name: str | None = None, artifact: str | None = None) -> list[CopyRef]:
        """Committed copies of one source (in its store), of one of its artifacts if named, or
        of all sources; oldest first."""
        if source_name:
            source = self.plan.source(source_name)
            store = self.store_for(source)
            module = kind_module(source.kind)
            return [
                CopyRef(store, m)
                for m in catalog.list_copies(store, source.name)
                if artifact is None or module.artifact_of(m) == artifact
            ]
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
            rule = RetentionRule(retention.daily, retention.weekly, retention.monthly)
            # Each part (one database's dumps, the base backups, ...) is its own series.
            series: dict[str, list[Manifest]] = defaultdict(list)
            for manifest in catalog.list_copies(store, source.name):
                series[manifest.part].append(manifest)
            expired: list[Manifest] = []
            for copies in series.values():
                decision = apply_retention(copies, rule)
                report.kept.update(decision.keep)
                expired += decision.expire
            for manifest in expired:
                key = manifest_key(manifest.source, manifest.id)
                if _locked(store, key, now) or _locked(store, manifest.data_key, now):
                    report.locked.append(manifest.id)
                    continue
                report.expired.append(manifest.id)
                if not dry_run:
                    store.delete(key)
                    store.delete(manifest.data_key)
            if isinstance(source, PostgresSource):
                survivors = [m for m in series.get(BASE_PART, []) if m.id not in report.expired]
                self._expire_wal(store, source, survivors, report, now)
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
                    f"{store.name}:{key}" for key in store.cleanup_incomplete(grace, _is_ours)
                )
        return report

    def _expire_wal(
        self,
        store: ObjectStore,
        source: PostgresSource,
        bases: list[Manifest],
        report: PruneReport,
        now: dt.datetime,
    ) -> None:
        """WAL older than the oldest base backup that stays can serve no recovery; without a base
        backup, all WAL stays."""
        if not bases:
            return
        oldest = min(bases, key=lambda m: lsn_value(m.source_metadata["start_lsn"]))
        meta = oldest.source_metadata
        start = segment_of(meta["start_lsn"], meta["timeline"], meta["wal_segment_size"])
        for entry in expendable_wal(archived_wal(store, source.name), start):
            if _locked(store, entry.key, now):
                continue
            report.wal_expired.append(entry.key)
            if not report.dry_run:
                store.delete(entry.key)

    def freshness(
        self, source_name: str, artifact: str | None = None, now: dt.datetime | None = None
    ) -> Freshness:
        """How old the artifact's newest copies are. For kinds that write several parts per run
        (one per database), the stalest part counts, and a part the kind expects but nobody
        wrote is missing: a database whose dump fails every night must not hide behind the
        others."""
        source = self.plan.source(source_name)
        chosen = self.artifact(source, artifact)
        copies = [ref.manifest for ref in self.copies(source.name, chosen.name)]
        newest_by_part = {
            part: catalog.latest_copy(m for m in copies if m.part == part)
            for part in kind_module(source.kind).expected_parts(chosen.name, copies)
        }
        present = [m for m in newest_by_part.values() if m is not None]
        return Freshness(
            source=source.name,
            max_age=chosen.max_age,
            newest=min(present, key=lambda m: (m.finished_at, m.id), default=None),
            now=now or utcnow(),
            missing_parts=sorted(part for part, m in newest_by_part.items() if m is None),
        )

    # --- PostgreSQL ----------------------------------------------------------------------------

    def postgres_source(self, name: str | None = None) -> PostgresSource:
        """The named PostgreSQL source, or the plan's only one when no name is given."""
        if name is not None:
            source = self.plan.source(name)
            if not isinstance(source, PostgresSource):
                raise UsageError(f"source {name!r} is a {source.kind} source, not postgres")
            return source
        found = [s for s in self.plan.sources if isinstance(s, PostgresSource)]
        if len(found) != 1:
            names = ", ".join(s.name for s in found) or "none"
            raise UsageError(f"name the PostgreSQL source (the plan has: {names})")
        return found[0]

    def wal_push(self, source_name: str | None, path: Path) -> str:
        source = self.postgres_source(source_name)
        store = self.store_for(source)
        lock = store.default_lock.lock_from(utcnow()) if store.default_lock else None
        return push_wal(
            store, source.name, path, self.recipients(), self._compression(source), lock
        )

    def wal_fetch(
        self,
        source_name: str | None,
        name: str,
        destination: Path,
        identity_file: str | Path | None = None,
    ) -> None:
        source = self.postgres_source(source_name)
        fetch_wal(
            self.store_for(source), source.name, name, destination, self.identities(identity_file)
        )

    def wal_archive_status(
        self, source_name: str | None, now: dt.datetime | None = None
    ) -> WalArchiveStatus:
        """How far the WAL archive lags behind the server, against the source's RPO."""
        source = self.postgres_source(source_name)
        if not source.wal_archiving:
            raise UsageError(f"source {source.name!r} does not archive WAL (wal_archiving: false)")
        entries = archived_wal(self.store_for(source), source.name)
        status = WalArchiveStatus(
            source=source.name, rpo=source.rpo, now=now or utcnow(), newest=newest_segment(entries)
        )
        server = PostgresServer.from_source(source, self.loaded)
        try:
            status.server = server_archive_state(server)
        except SparkBackupError as exc:
            status.server_error = str(exc)
        return status

    def archiving_settings(self, source_name: str | None) -> dict[str, str]:
        """The server settings for continuous archiving into this plan's store (docs/runbooks/
        postgres.md explains each)."""
        source = self.postgres_source(source_name)
        self.store_for(source).check()  # reachable, and a local store's folder exists for wal-push
        command = shutil.which("spark-backup") or str(
            Path(sys.executable).with_name("spark-backup")
        )
        return {
            "wal_level": "replica",
            "archive_mode": "on",
            # A partly filled segment is archived after at most this long: the RPO floor.
            "archive_timeout": "60s",
            "archive_command": (
                f"{shlex.quote(command)} --plan {shlex.quote(str(self.loaded.path))} "
                f"wal-push --source {source.name} %p"
            ),
            "max_wal_senders": "10",
        }

    def apply_archiving_settings(
        self, source_name: str | None, settings: dict[str, str]
    ) -> list[str]:
        """ALTER SYSTEM each setting and reload; return those that need a restart."""
        source = self.postgres_source(source_name)
        return pg_apply_settings(PostgresServer.from_source(source, self.loaded), settings)

    def restore_to_database(
        self,
        copy_id: str,
        database: str,
        *,
        identity_file: str | Path | None = None,
        force: bool = False,
        no_owner: bool = False,
        progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """Restore a database dump into ``database`` on the source's server and check every
        table's row count against the dump's. The dump goes into a new staging database that
        takes the name only once the copy's checksums and the counts matched (with ``force``,
        replacing the database of that name); a failed restore drops the staging database."""
        ref = self.find(copy_id)
        source = self.postgres_source(ref.manifest.source)
        server = PostgresServer.from_source(source, self.loaded)
        identities = self.identities(identity_file)
        exists = pg_dump_restore.check_target_database(server, ref.manifest, database, force)
        started = utcnow()
        staging = pg_dump_restore.staging_database_name(database)
        pg_dump_restore.create_database(server, staging, like=ref.manifest)
        try:
            with open_copy(ref.store, ref.manifest, identities, progress) as plain:
                pg_dump_restore.pg_restore_into(server, plain, staging, no_owner=no_owner)
            counts = pg_dump_restore.check_row_counts(server, ref.manifest, staging, database)
            pg_dump_restore.publish_database(server, staging, database, replace=exists)
        except BaseException:
            pg_dump_restore.drop_database(server, staging)
            raise
        return {
            "copy_id": copy_id,
            "source": source.name,
            "database": database,
            "tables": len(counts),
            "rows": sum(counts.values()),
            "seconds": round((utcnow() - started).total_seconds(), 3),
        }

    def pitr(
        self,
        source_name: str | None,
        target_time: dt.datetime | None,
        target_dir: Path,
        *,
        port: int = recovery.DEFAULT_PORT,
        identity_file: str | Path | None = None,
        stop_after: bool = False,
        progress: ProgressCallback | None = None,
    ) -> recovery.PitrReport:
        """Recover the source to ``target_time`` (None: to the end of the archived WAL, for a
        disaster) in a new cluster under ``target_dir``, start it and verify it. The production
        cluster is not touched."""
        source = self.postgres_source(source_name)
        store = self.store_for(source)
        target_dir = Path(os.path.abspath(target_dir))
        if target_time is not None and target_time > utcnow():
            raise UsageError(
                f"--to-time {target_time.isoformat()} is in the future; use 'latest' to recover "
                "all archived WAL"
            )
        base = recovery.choose_base(
            [r.manifest for r in self.copies(source.name, "base")], target_time, source.name
        )
        identities = self.identities(identity_file)
        os_user = recovery.default_os_user()
        recovery.prepare_target(target_dir, os_user)
        user = PostgresServer.from_source(source, self.loaded).user or "postgres"
        report = recovery.PitrReport(
            source.name,
            user,
            base.id,
            target_time.isoformat() if target_time else recovery.LATEST,
            str(target_dir),
            port,
        )
        major = int(str(base.source_metadata["server_version"]).split(".")[0])
        bin_dir = self.loaded.resolve(source.bin_dir) if source.bin_dir else None
        pg_ctl = recovery.server_binary("pg_ctl", major, bin_dir)
        started = False
        try:
            recovery.timed(
                report,
                "restore_base_backup",
                lambda: kind_module(KIND_POSTGRES).restore_copy(
                    store, base, identities, target_dir / recovery.DATA_FOLDER, progress=progress
                ),
            )
            wanted, gap = recovery.wal_to_fetch(base, archived_wal(store, source.name))
            wal_folder = target_dir / recovery.WAL_CACHE_FOLDER
            wal_folder.mkdir()
            recovery.configure_recovery(target_dir, target_time, port, os_user)
            batches = recovery.wal_batches(wanted, target_time)
            for number, batch in enumerate(batches, start=1):
                recovery.timed(
                    report,
                    "fetch_wal",
                    lambda batch=batch: self._fetch_wal_files(
                        store, source.name, batch, wal_folder, identities
                    ),
                )
                recovery.hand_over(wal_folder, os_user)  # the rest was handed over before
                report.wal_files += len(batch)
                started = True
                try:
                    recovery.timed(
                        report,
                        "recovery",
                        lambda: recovery.start_and_wait(
                            pg_ctl, target_dir, port, os_user, recovery.START_TIMEOUT_SECONDS, user
                        ),
                    )
                    break
                except SourceError as exc:
                    if recovery.ENDED_EARLY not in str(exc):
                        raise  # the server would not start at all: its own reason says why
                    if number < len(batches):
                        continue  # the archive has more: fetch it, and recovery resumes
                    points = recovery.recovery_points(target_dir / recovery.LOG_FILE)
                    reached = points["last_transaction"] or points["redo_done_lsn"] or "unknown"
                    missing = f"segment {gap} is missing" if gap else "it ends"
                    raise IntegrityError(
                        f"recovery of {source.name!r} cannot reach {report.target_time}: the "
                        f"WAL archive has no more WAL ({missing}); the last reachable point is "
                        f"{reached}. Choose --to-time at or before it. ({exc})"
                    ) from None
            points = recovery.recovery_points(target_dir / recovery.LOG_FILE)
            report.stopped = points["stopped"]
            report.last_transaction = points["last_transaction"]
            report.recovered_to = points["last_transaction"]
            if target_time is None:
                # "latest" must mean all of the archive: a gap, or WAL that was fetched but not
                # replayed, is an early stop nobody chose.
                recovery.check_replayed_all(
                    points, wanted, gap, source.name, base.source_metadata["wal_segment_size"]
                )
            report.databases = recovery.timed(
                report, "verify", lambda: recovery.verify_cluster(target_dir, port, base, user)
            )
            report.ok = True
        except SparkBackupError as exc:
            report.error = str(exc)
            raise
        finally:
            if started and (stop_after or not report.ok):
                recovery.stop(pg_ctl, target_dir, os_user)
            recovery.remove_wal_cache(target_dir)
            recovery.write_report(target_dir, report)
        return report

    @staticmethod
    def _fetch_wal_files(
        store: ObjectStore,
        source: str,
        entries: list[ArchivedWal],
        folder: Path,
        identities: list[x25519.Identity],
    ) -> None:
        # Each file is decrypted in its own worker process: a few at a time keep the cores
        # busy (a day of WAL at 60 s archive_timeout is over 1,400 files).
        with ThreadPoolExecutor(max_workers=WAL_FETCH_WORKERS) as pool:
            futures = [
                pool.submit(
                    fetch_wal, store, source, entry.name, folder / entry.name, identities, entry
                )
                for entry in entries
            ]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()  # an error or Ctrl-C: do not wait for the queued files
                raise


@dataclass
class WalArchiveStatus:
    """The WAL archive's lag: how much committed work a loss of the server now would lose at
    most. Zero when everything the server has written is archived; otherwise the age of the
    newest archived segment (everything since may be lost)."""

    source: str
    rpo: dt.timedelta
    now: dt.datetime
    newest: ArchivedWal | None
    server: ServerArchiveState | None = None
    server_error: str | None = None

    @property
    def lag(self) -> dt.timedelta | None:
        if self.newest is None:
            return None
        age = max(self.now - self.newest.modified, dt.timedelta(0))
        server = self.server
        if server is None:
            return age
        if server.current_segment_archived(self.newest.name):
            return dt.timedelta(0)
        timeout = dt.timedelta(seconds=server.archive_timeout_seconds)
        if server.completed_segments_archived(self.newest.name) and (
            dt.timedelta(0) < timeout <= self.rpo
        ):
            # Only the open segment is missing, and the server closes it within archive_timeout
            # once it holds anything that matters; an idle server (which writes only records
            # that never force a switch) must not look as if it fell behind.
            return min(age, timeout)
        return age

    @property
    def ok(self) -> bool:
        return self.lag is not None and self.lag <= self.rpo


@dataclass(frozen=True)
class Freshness:
    """How old the newest committed copy of an artifact is (of its stalest part), against its
    allowed maximum age."""

    source: str
    max_age: dt.timedelta
    newest: Manifest | None
    now: dt.datetime
    missing_parts: list[str] = field(default_factory=list)

    @property
    def age(self) -> dt.timedelta | None:
        return self.now - self.newest.finished if self.newest else None

    @property
    def ok(self) -> bool:
        return not self.missing_parts and self.age is not None and self.age <= self.max_age


def _is_ours(key: str) -> bool:
    return is_copy_key(key) or is_wal_key(key)


def _locked(store: ObjectStore, key: str, now: dt.datetime) -> bool:
    try:
        lock = store.lock_of(key)
    except NotFoundError:
        return False
    return bool(lock and lock.active(now))
