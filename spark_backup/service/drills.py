"""Restore drills: restore a partition's copies into staging, prove them usable with the kind's
semantic check, time it against the source's RTO, tear the staging down, record the result
beside each copy.

The staging target is the drill's own: a folder made fresh for this drill (``mkdtemp``, never an
existing one), handed to each kind's ``SemanticCheck``, which restores into scratch space of its
own inside it or beside it (a configuration tree into the folder, a PostgreSQL dump into a
scratch database on the source's server that it creates and drops) and leaves it empty. A kind
without a semantic check is restored into the folder with ``restore_to_folder``. The folder is
removed whatever happens, and the drill fails if it could not be.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spark_backup.engine.cadence import utcnow
from spark_backup.engine.catalog import latest_per_part
from spark_backup.engine.drill_record import DrillRecord, latest_drills, write_drill_record
from spark_backup.engine.staging import remove_tree
from spark_backup.errors import NotFoundError, SparkBackupError, UsageError
from spark_backup.service.journal import JournalOperations
from spark_backup.sources.base import CopyRef, FolderRestore, SemanticCheck

# What a drill of a kind without a semantic check proves: the copy restores into a folder.
RESTORE_ONLY_CHECK = "restore"
STAGING_PREFIX = "spark-backup-drill-"


@dataclass
class DrillStep:
    """One copy restored and checked."""

    copy_id: str
    part: str
    check: str
    passed: bool
    seconds: float
    description: str
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class DrillReport:
    source: str
    artifact: str
    partition: str
    started_at: str
    finished_at: str
    rto_seconds: float
    staging: str
    steps: list[DrillStep]
    torn_down: bool
    # The stores' keys of the drill records written.
    records: list[str] = field(default_factory=list)
    teardown_error: str | None = None
    # The journal files and documents written, and those that could not be (left unchanged).
    journal: list[str] = field(default_factory=list)
    journal_errors: list[str] = field(default_factory=list)

    @property
    def restore_seconds(self) -> float:
        """The measured restore time: every part of the partition restored and checked."""
        return round(sum(step.seconds for step in self.steps), 3)

    @property
    def within_rto(self) -> bool:
        return self.restore_seconds <= self.rto_seconds

    @property
    def passed(self) -> bool:
        return bool(self.steps) and all(s.passed for s in self.steps) and self.torn_down

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "restore_seconds": self.restore_seconds,
            "within_rto": self.within_rto,
            "passed": self.passed,
        }


class DrillOperations(JournalOperations):
    def drill_copies(
        self, source_name: str, artifact: str | None = None, partition: str | None = None
    ) -> list[CopyRef]:
        """The newest copy of each part of the partition (of the newest partition that has a
        copy, if none is named): what a restore of that period would use."""
        source = self.plan.source(source_name)
        chosen = self.artifact(source, artifact)
        refs = self.copies(source.name, chosen.name)
        if partition is None:
            newest = max(refs, key=lambda r: (r.manifest.finished_at, r.manifest.id), default=None)
            partition = newest.manifest.partition if newest else None
        by_id = {ref.manifest.id: ref for ref in refs}
        chosen_refs = (
            [by_id[m.id] for m in latest_per_part((r.manifest for r in refs), partition)]
            if partition is not None
            else []
        )
        if not chosen_refs:
            where = f"partition {partition}" if partition else "any partition"
            raise NotFoundError(f"no committed copy of {source.name} ({chosen.name}) for {where}")
        return chosen_refs

    def drill(
        self,
        source_name: str,
        artifact: str | None = None,
        partition: str | None = None,
        *,
        identity_file: str | Path | None = None,
        staging_root: str | Path | None = None,
    ) -> DrillReport:
        """Drill one partition of an artifact. A copy that fails to restore or to pass its
        check is a failed step, not an exception; a missing key or copy raises before anything
        is restored. The drill is journaled; a passed one updates the task overview and the
        Definition of Done."""
        source = self.plan.source(source_name)
        chosen = self.artifact(source, artifact)
        refs = self.drill_copies(source.name, chosen.name, partition)
        identities = self.identities(identity_file)
        started = utcnow()
        staging = make_staging(source.name, staging_root)
        steps: list[DrillStep] = []
        teardown_error = None
        try:
            for index, ref in enumerate(refs):
                scratch = staging / f"{index:03d}"
                scratch.mkdir(mode=0o700)
                steps.append(self._drill_one(ref, identities, scratch))
        finally:
            try:
                remove_tree(staging)
            except OSError as exc:
                teardown_error = f"staging {staging} not removed: {exc.strerror}"
        report = DrillReport(
            source=source.name,
            artifact=chosen.name,
            partition=refs[0].manifest.partition,
            started_at=started.isoformat(),
            finished_at=utcnow().isoformat(),
            rto_seconds=source.rto.total_seconds(),
            staging=str(staging),
            steps=steps,
            torn_down=not os.path.lexists(staging),
            teardown_error=teardown_error,
        )
        for ref, step in zip(refs, steps, strict=True):
            record = DrillRecord(
                copy_id=ref.manifest.id,
                source=source.name,
                partition=ref.manifest.partition,
                part=ref.manifest.part,
                drilled_at=report.finished_at,
                passed=step.passed and report.torn_down,
                restore_seconds=step.seconds,
                drill_seconds=report.restore_seconds,
                rto_seconds=report.rto_seconds,
                within_rto=report.within_rto,
                check=step.check,
                description=step.description,
                metrics=step.metrics,
            )
            report.records.append(write_drill_record(ref.store, record))
        report.journal, report.journal_errors = self.journal_drill(report)
        return report

    def _drill_one(self, ref: CopyRef, identities: list, scratch: Path) -> DrillStep:
        kind = self.kind_named(ref.manifest.kind)
        check = kind.semantic_check_name if isinstance(kind, SemanticCheck) else RESTORE_ONLY_CHECK
        clock = time.monotonic()
        try:
            if isinstance(kind, SemanticCheck):
                result = kind.semantic_check(self, ref, identities, scratch)
                passed, description, metrics = result.passed, result.description, result.metrics
            else:
                summary = kind.restore_to_folder(
                    ref, identities, scratch / "restore", FolderRestore()
                )
                passed, description = (
                    True,
                    f"restored into staging ({summary.get('files', '?')} files)",
                )
                metrics = {k: v for k, v in summary.items() if isinstance(v, int | float)}
        except SparkBackupError as exc:
            passed, description, metrics = False, str(exc), {}
        seconds = round(time.monotonic() - clock, 3)
        return DrillStep(
            ref.manifest.id, ref.manifest.part, check, passed, seconds, description, metrics
        )

    def drill_status(self, source_name: str) -> dict[str, DrillRecord]:
        """The newest drill record of each copy of a source, by copy id."""
        source = self.plan.source(source_name)
        return latest_drills(self.store_for(source), source.name)

    def last_drill(self, source_name: str) -> DrillRecord | None:
        records = self.drill_status(source_name).values()
        return max(records, key=lambda r: r.drilled_at, default=None)


def make_staging(name: str, staging_root: str | Path | None) -> Path:
    """A fresh folder of the drill's own (never an existing one), mode 0700."""
    try:
        return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{name}-", dir=staging_root))
    except OSError as exc:
        raise UsageError(
            f"cannot make the drill's staging folder in {staging_root or tempfile.gettempdir()}: "
            f"{exc.strerror}"
        ) from None


def drill_age(record: DrillRecord | None, now: dt.datetime | None = None) -> dt.timedelta | None:
    return (now or utcnow()) - record.drilled if record else None
