"""The deletion concept's yearly review: its file says when it was last reviewed."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from spark_backup.engine.pipeline import utcnow
from spark_backup.service.runtime import PlanRuntime

_REVIEWED_RE = re.compile(r"^Last reviewed:\s*(\d{4}-\d{2}-\d{2})\s*$", re.MULTILINE)


@dataclass(frozen=True)
class ReviewStatus:
    ok: bool
    reviewed: dt.date | None
    description: str


class ComplianceOperations(PlanRuntime):
    def deletion_concept_review(self, now: dt.datetime | None = None) -> ReviewStatus:
        compliance = self.plan.compliance
        if compliance.deletion_concept is None:
            return ReviewStatus(
                False, None, "compliance.deletion_concept is not set: no deletion concept to review"
            )
        path = self.loaded.resolve(compliance.deletion_concept)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            return ReviewStatus(
                False, None, f"{path}: cannot read the deletion concept: {exc.strerror}"
            )
        match = _REVIEWED_RE.search(text)
        if not match:
            return ReviewStatus(False, None, f"{path}: no 'Last reviewed: YYYY-MM-DD' line")
        reviewed = dt.date.fromisoformat(match[1])
        age = (now or utcnow()).date() - reviewed
        limit = compliance.review_every.days
        if age.days > limit:
            return ReviewStatus(
                False,
                reviewed,
                f"deletion concept last reviewed {reviewed}, {age.days} days ago "
                f"(review every {limit} days): review it and update {path.name}",
            )
        return ReviewStatus(
            True, reviewed, f"deletion concept reviewed {reviewed}, {age.days} days ago"
        )
