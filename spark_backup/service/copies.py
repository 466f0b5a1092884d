"""Copies: back up, verify and restore, for every kind alike."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyrage import x25519

from spark_backup.engine.age_worker import AgeWorker
from spark_backup.engine.cadence import cadence, utcnow
from spark_backup.engine.catalog import DamagedManifest
from spark_backup.engine.datakeys import erase_months, recipients_for
from spark_backup.engine.manifest import Manifest
from spark_backup.engine.pipeline import Verification, open_copy, verify_copy, write_copy
from spark_backup.engine.streams import ProgressCallback
from spark_backup.errors import IntegrityError, NotFoundError, SparkBackupError, UsageError
from spark_backup.service.journal import JournalOperations
from spark_backup.service.locks import LockOperations
from spark_backup.sources.base import CopyRef, RestoreTargets, SharedObjects


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
    # What was checked: "stored sha256 and size", and for a deep verify also the plaintext.
    checks: tuple[str, ...] = ()
    # The manifest's signature: "signed", "unsigned" (an accepted earlier copy), "not checked".
    signature: str = "not checked"
    # The CLI's exit code when this copy fails: 3, or 11 for a refused signature.
    exit_code: int = IntegrityError.exit_code
    # The Object Lock read back from a WORM store (``LockStatus.as_dict``); None elsewhere.
    worm: dict[str, Any] | None = None
    # What the operator must know although the copy is intact (files the backup read torn).
    cautions: list[str] = field(default_factory=list)

    @classmethod
    def of_damaged(cls, damaged: DamagedManifest, deep: bool) -> VerifyOutcome:
        return cls(
            damaged.copy_id or damaged.key,
            "",
            "",
            False,
            deep,
            damaged.error,
            exit_code=damaged.exit_code,
        )


STORED_CHECK = "stored sha256 and size"
DEEP_CHECKS = ("decrypted with age", "zstd frame checksums", "plaintext sha256 and size")


class CopyOperations(JournalOperations, LockOperations):
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
            cadence(chosen.cadence).check_key(
                partition, utcnow(), self.plan.defaults.partitions_start
            )
        store = self.store_for(source)
        store.check()  # an unreachable store or rejected credentials: say so before reading
        readers = self.kind_of(source).readers(source, self.context(source), chosen.name)
        # One partition for the whole run, even one that crosses midnight.
        partition = partition or self.current_partition(chosen)
        recipients, compression = self.recipients(), self.compression(source)
        signer = self.signer()
        month_key = None
        if source.personal_data:
            recipients, month_key = recipients_for(
                store, source.name, utcnow(), recipients, signer, self.verifier
            )
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
                        signer=signer,
                        month_key=month_key,
                    )
                )
            except SparkBackupError as exc:
                failures.append(exc)
        if manifests:
            self.update_index(store, source.name)
        for manifest in manifests:
            self.journal_backup(manifest)
        if failures:
            raise failures[0]
        return manifests

    def verify(
        self,
        ref: CopyRef,
        identities: list[x25519.Identity] | None = None,
        progress: ProgressCallback | None = None,
        worker: AgeWorker | None = None,
    ) -> VerifyOutcome:
        """Verify one copy: plain, or deep with ``identities``. To verify many copies deeply,
        pass one ``decryption_worker`` for them all: each copy then costs no process start."""
        manifest = ref.manifest
        outcome = VerifyOutcome(
            manifest.id,
            manifest.source,
            manifest.partition,
            ok=False,
            deep=bool(identities),
            signature=ref.signature,
        )
        try:
            if identities:
                result = self._verify_deep(ref, identities, progress, worker)
                outcome.checks = (STORED_CHECK, *DEEP_CHECKS, f"{manifest.kind} format")
            else:
                result = verify_copy(ref.store, manifest, progress)
                outcome.checks = (STORED_CHECK,)
            kind = self.kind_named(manifest.kind)
            if isinstance(kind, SharedObjects):
                outcome.checks += tuple(kind.check_shared(self, ref, identities or None))
        except (IntegrityError, NotFoundError) as exc:
            # The copy is damaged or its data is gone. A wrong key or an unreachable store is
            # not a verdict on the copy: those propagate with their own exit codes.
            outcome.error = str(exc)
            return outcome
        outcome.cautions = self.kind_named(manifest.kind).cautions(manifest)
        outcome.bytes_read = result.bytes_read
        outcome.seconds = result.seconds
        lock = self.lock_status(ref)
        if lock is not None:
            outcome.worm = lock.as_dict()
            outcome.checks = (*outcome.checks, f"{lock.expected_mode} Object Lock read back")
            if lock.problems:
                outcome.error = f"copy {manifest.id}: WORM: {'; '.join(lock.problems)}"
                return outcome
        outcome.ok = True
        return outcome

    def decryption_worker(self, identities: list[x25519.Identity]) -> AgeWorker:
        """One age worker process for many decryptions (started on first use); use it in a
        ``with`` block so that it stops."""
        return AgeWorker(identities)

    def _verify_deep(
        self,
        ref: CopyRef,
        identities: list[x25519.Identity],
        progress: ProgressCallback | None,
        worker: AgeWorker | None,
    ) -> Verification:
        started = utcnow()
        kind = self.kind_named(ref.manifest.kind)
        with open_copy(ref.store, ref.manifest, identities, progress, worker) as plain:
            kind.check_plaintext(plain, ref.manifest)
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
        worker: AgeWorker | None = None,
    ) -> dict[str, Any]:
        """Restore a copy into a staging folder, published only after its digests matched.
        ``worker``: an ``AgeWorker`` started ahead without identities (the caller closes it),
        so that its start overlaps reading the plan and the manifest."""
        from spark_backup.sources.capability_values import FolderRestore

        ref = self.find(copy_id)
        identities = self.identities(identity_file)
        started = utcnow()
        kind = self.kind_named(ref.manifest.kind)
        summary = kind.restore_to_folder(
            ref, identities, target, FolderRestore(overwrite, skip_unsafe, progress, worker)
        )
        return {
            "copy_id": copy_id,
            "source": ref.manifest.source,
            "partition": ref.manifest.partition,
            "seconds": round((utcnow() - started).total_seconds(), 3),
            "cautions": kind.cautions(ref.manifest),
            **summary,
        }

    def restore_to(
        self,
        target: str,
        copy_id: str,
        value: str,
        *,
        identity_file: str | Path | None = None,
        flags: Mapping[str, bool] | None = None,
        progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """Restore a copy into a target its kind offers (a database, a namespace)."""
        ref = self.find(copy_id)
        kind = self.kind_named(ref.manifest.kind)
        offered = kind.restore_targets() if isinstance(kind, RestoreTargets) else ()
        if not any(t.name == target for t in offered):
            raise UsageError(
                f"copy {copy_id} is a {kind.name} copy, which cannot be restored into a {target}"
            )
        assert isinstance(kind, RestoreTargets)
        return kind.restore_to_target(
            self, target, ref, value, identity_file=identity_file, flags=flags, progress=progress
        )

    def erase(self, source_name: str, before: dt.date, dry_run: bool = True) -> dict[str, Any]:
        """Crypto-shred every whole month of a ``personal_data`` source before ``before``:
        destroy those months' data keys, so their copies can no longer be opened while their
        (possibly locked) objects stay. Returns the months and the copies made unreadable."""
        source = self.plan.source(source_name)
        if not source.personal_data:
            raise UsageError(
                f"source {source_name!r} is not marked personal_data: its copies have no data "
                "keys of their own and cannot be erased selectively"
            )
        now = utcnow()
        if before > now.date():
            raise UsageError(f"--before {before} is in the future")
        store = self.store_for(source)
        months = erase_months(store, source.name, before, now, dry_run)
        erased = {f"{source.name}/keys/{month}.json" for month in months}
        copies = [
            ref.manifest.id
            for ref in self.copies(source.name)
            if ref.manifest.encryption.get("data_key") in erased
        ]
        return {"source": source.name, "months": months, "copies": copies, "dry_run": dry_run}
