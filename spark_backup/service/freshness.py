"""Freshness: is the newest copy of every artifact young enough?"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from spark_backup.engine import catalog
from spark_backup.engine.cadence import utcnow
from spark_backup.engine.manifest import Manifest
from spark_backup.service.runtime import PlanRuntime


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


class FreshnessOperations(PlanRuntime):
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
            for part in self.kind_of(source).expected_parts(chosen.name, copies)
        }
        present = [m for m in newest_by_part.values() if m is not None]
        return Freshness(
            source=source.name,
            max_age=chosen.max_age,
            newest=min(present, key=lambda m: (m.finished_at, m.id), default=None),
            now=now or utcnow(),
            missing_parts=sorted(part for part, m in newest_by_part.items() if m is None),
        )
