"""The deletion concept's yearly review (its file says when it was last reviewed), and the
lifecycle rule that aborts incomplete multipart uploads on an S3 store."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from spark_backup.engine.cadence import utcnow
from spark_backup.service.retention import owned_by_spark_backup
from spark_backup.service.runtime import PlanRuntime

_REVIEWED_RE = re.compile(r"^Last reviewed:\s*(\d{4}-\d{2}-\d{2})\s*$", re.MULTILINE)


@dataclass(frozen=True)
class ReviewStatus:
    ok: bool
    reviewed: dt.date | None
    description: str


@dataclass(frozen=True)
class UploadLifecycle:
    """Whether a lifecycle rule aborts the incomplete multipart uploads a killed backup leaves
    on the store (parts are billed and hold plaintext sizes until then)."""

    store: str
    abort_after_days: int | None
    # Our incomplete uploads with no progress for longer than the rule allows: not enforced.
    overdue: tuple[str, ...]
    # Our incomplete uploads with no progress for the orphan grace: ``prune`` aborts them.
    stale: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.abort_after_days is not None and not self.overdue

    @property
    def description(self) -> str:
        if self.abort_after_days is None:
            return (
                f"store {self.store!r} has no enabled lifecycle rule with "
                "AbortIncompleteMultipartUpload for its prefix (see docs/runbooks/worm-s3.md)"
            )
        if self.overdue:
            return (
                f"store {self.store!r}: {len(self.overdue)} incomplete upload(s) older than the "
                f"rule's {self.abort_after_days} days are still there: "
                + ", ".join(self.overdue[:5])
            )
        waiting = f"; {len(self.stale)} stale upload(s) left for prune" if self.stale else ""
        return (
            f"store {self.store!r}: incomplete uploads are aborted after "
            f"{self.abort_after_days} days{waiting}"
        )


class ComplianceOperations(PlanRuntime):
    def upload_lifecycle(
        self, source_name: str, now: dt.datetime | None = None
    ) -> UploadLifecycle | None:
        """The store of ``source_name``'s abort rule and its incomplete uploads; None for a
        store without multipart uploads."""
        store = self.store_for(self.plan.source(source_name))
        if not store.multipart:
            return None
        days = store.upload_abort_days()
        grace = self.plan.defaults.orphan_grace
        stale = store.cleanup_incomplete(grace, owned_by_spark_backup, apply=False, now=now)
        overdue: list[str] = []
        if days is not None:
            # A lifecycle runs about once a day: a day's slack before calling the rule ignored.
            limit = dt.timedelta(days=days + 1)
            overdue = store.cleanup_incomplete(limit, owned_by_spark_backup, apply=False, now=now)
        return UploadLifecycle(store.name, days, tuple(overdue), tuple(stale))

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
