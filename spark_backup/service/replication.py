"""Replication: every copy of a source that names targets (``replicate_to``) pushed to each
target, and the ``replicated`` check comparing what a target holds with the version's digests.

Records beside the copy (``engine/replication/records.py``) say per target whether a version
is replicated. A push that fails (the target down, a refused upload, a damaged source) records
the version unreplicated with the reason, and the next run pushes it again: a version is never
lost and nothing is deleted, neither the copy nor anything on the target. A check that finds a
missing replica or other digests records the version unreplicated too, so the next run pushes
what is missing (the targets are create-only: a replica holding other bytes under a version's
name stays as found and keeps failing the check until someone looks).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from spark_backup.engine.cadence import utcnow
from spark_backup.engine.replication import (
    OciReplicaConfig,
    ReplicaRecord,
    ReplicaTarget,
    ReplicaVersion,
    StoreReplica,
    copy_version,
    newest_records,
    write_record,
)
from spark_backup.engine.stores import open_store
from spark_backup.errors import IntegrityError, NotFoundError, StoreError, UsageError
from spark_backup.service.runtime import PlanRuntime
from spark_backup.sources.base import CopyRef, Replicable

log = logging.getLogger(__name__)


@dataclass
class ReplicaOutcome:
    source: str
    version: str
    partition: str
    target: str
    replicated: bool
    location: str
    problem: str | None = None
    pushed: bool = False
    digests: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _compare(expected: dict[str, str], held: dict[str, str]) -> str | None:
    """Why ``held`` is not a replica of ``expected``, or None."""
    if not held:
        return "no replica"
    missing = sorted(set(expected) - set(held))
    if missing:
        return f"replica lacks {', '.join(missing)}"
    differing = sorted(n for n in expected if held[n] != expected[n])
    if differing:
        name = differing[0]
        return f"replica's {name} has digest {held[name][:19]}..., the version {expected[name][:19]}..."
    return None


class ReplicationOperations(PlanRuntime):
    def replica_target(self, name: str) -> ReplicaTarget:
        targets: dict[str, ReplicaTarget] = self.__dict__.setdefault("_replica_targets", {})
        if name not in targets:
            config = next((r for r in self.plan.replication if r.name == name), None)
            if config is None:
                raise UsageError(f"no replication target {name!r} in the plan")
            if isinstance(config, OciReplicaConfig):
                from spark_backup.engine.replication.oci import OciReplica

                targets[name] = OciReplica(config)
            else:
                store = open_store(config.store, self.loaded.resolve, self.secrets)
                targets[name] = StoreReplica(name, store)
        return targets[name]

    def replicated_sources(self) -> list[str]:
        return [s.name for s in self.plan.sources if s.replicate_to]

    def version_of(self, ref: CopyRef) -> ReplicaVersion:
        kind = self.kind_named(ref.manifest.kind)
        if isinstance(kind, Replicable):
            return kind.replica_version(ref)
        return copy_version(ref.store, ref.manifest)

    def _scope(self, source_name: str, artifact: str | None) -> tuple[Any, list[CopyRef]]:
        """The source's store and copies; a source without targets is a usage error."""
        source = self.plan.source(source_name)
        if not source.replicate_to:
            raise UsageError(f"source {source_name!r} names no replication target (replicate_to)")
        return self.store_for(source), self.copies(source_name, artifact)

    def replicate(
        self,
        source_name: str,
        artifact: str | None = None,
        partition: str | None = None,
        now: dt.datetime | None = None,
    ) -> list[ReplicaOutcome]:
        """Push to each of the source's targets the partition's copies and every copy not yet
        replicated there (without a partition: only those); record each result."""
        store, refs = self._scope(source_name, artifact)
        outcomes = []
        versions: dict[str, ReplicaVersion] = {}
        for name in self.plan.source(source_name).replicate_to:
            target = self.replica_target(name)
            records = newest_records(store, source_name, name)
            for ref in refs:
                record = records.get(ref.manifest.id)
                in_scope = ref.manifest.partition == partition
                if record is not None and record.replicated and not in_scope:
                    continue
                outcome = self._judge(target, ref, versions, push=True)
                outcomes.append(outcome)
                self._record(store, outcome, target, now)
        return outcomes

    def check_replicas(
        self,
        source_name: str,
        artifact: str | None = None,
        partition: str | None = None,
        now: dt.datetime | None = None,
    ) -> list[ReplicaOutcome]:
        """Compare each target's replica of the partition's copies (every copy, without one)
        with the version's digests. A changed verdict is recorded (a replica gone missing marks
        its version unreplicated, and the next run pushes it again); nothing is deleted."""
        store, refs = self._scope(source_name, artifact)
        refs = [r for r in refs if partition is None or r.manifest.partition == partition]
        outcomes = []
        versions: dict[str, ReplicaVersion] = {}
        for name in self.plan.source(source_name).replicate_to:
            target = self.replica_target(name)
            records = newest_records(store, source_name, name)
            for ref in refs:
                outcome = self._judge(target, ref, versions, push=False)
                outcomes.append(outcome)
                previous = records.get(ref.manifest.id)
                if previous is None or previous.replicated != outcome.replicated:
                    self._record(store, outcome, target, now)
        return outcomes

    def _judge(
        self,
        target: ReplicaTarget,
        ref: CopyRef,
        versions: dict[str, ReplicaVersion],
        push: bool,
    ) -> ReplicaOutcome:
        """Push the copy's version (or only look, without ``push``) and compare what the
        target holds with its digests; a failure is the outcome's problem, never raised.
        ``versions``: the versions built in this run, by copy id (building one may read every
        object it is made of, once for all targets)."""
        m = ref.manifest
        outcome = ReplicaOutcome(m.source, m.id, m.partition, target.name, False, "")
        try:
            if m.id not in versions:
                versions[m.id] = self.version_of(ref)
            version = versions[m.id]
            outcome.location = target.location(version)
            outcome.digests = target.push(version) if push else target.held(version)
            outcome.pushed = push
            outcome.problem = _compare(version.expected(), outcome.digests)
        except (StoreError, IntegrityError, NotFoundError) as exc:
            outcome.problem = str(exc)
        outcome.replicated = outcome.problem is None
        return outcome

    def _record(
        self, store: Any, outcome: ReplicaOutcome, target: ReplicaTarget, now: dt.datetime | None
    ) -> None:
        record = ReplicaRecord(
            source=outcome.source,
            version=outcome.version,
            partition=outcome.partition,
            target=target.name,
            target_kind=target.kind,
            recorded_at=(now or utcnow()).isoformat(),
            replicated=outcome.replicated,
            location=outcome.location,
            digests=outcome.digests,
            problem=outcome.problem,
        )
        try:
            write_record(store, record)
        except StoreError as exc:
            # The verdict stands for this run; without a record the next run tries again.
            log.warning("replica record of %s not written: %s", outcome.version, exc)
