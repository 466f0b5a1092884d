"""Grandfather-father-son retention: which copies a rule keeps, and why.

The rule reads like restic's ``--keep-daily/--keep-weekly/--keep-monthly``: walking from the newest
copy back, keep the newest copy of each of the last N days (weeks, months) that have a copy. The
newest copy of a source is always kept, and so is its newest verified copy (the newest one a
restore drill passed): if every newer copy turns out damaged, the last one proven to restore is
still there, whatever the tiers say. Periods are taken from when a copy finished, in UTC
(the partitions' time zone): that is the state a copy holds, whatever partition slot it was made for.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from spark_backup.engine.cadence import cadence
from spark_backup.engine.manifest import Manifest


@dataclass(frozen=True)
class RetentionRule:
    """How many daily, weekly and monthly copies to keep."""

    daily: int
    weekly: int
    monthly: int


@dataclass(frozen=True)
class RetentionDecision:
    """What a retention rule keeps (and why) and what it expires."""

    keep: dict[str, list[str]]  # copy id -> reasons
    expire: list[Manifest]


# Each tier counts the periods of the cadence of its name (engine/cadence.py).
TIERS = ("daily", "weekly", "monthly")


NEWEST = "newest copy"
NEWEST_VERIFIED = "newest verified copy"


def apply_retention(
    copies: Sequence[Manifest], rule: RetentionRule, verified: Collection[str] = ()
) -> RetentionDecision:
    """Which ``copies`` (one series) ``rule`` keeps; ``verified``: ids of copies that passed a
    restore drill, the newest of which is kept too."""
    newest_first = sorted(copies, key=lambda m: (m.finished_at, m.id), reverse=True)
    keep: dict[str, list[str]] = {}
    if newest_first:
        keep[newest_first[0].id] = [NEWEST]
    newest_verified = next((m for m in newest_first if m.id in verified), None)
    if newest_verified is not None:
        keep.setdefault(newest_verified.id, []).append(NEWEST_VERIFIED)
    for name in TIERS:
        limit, period_of = getattr(rule, name), cadence(name).key_for
        seen: set[str] = set()
        for manifest in newest_first:
            if len(seen) >= limit:
                break
            period = period_of(manifest.finished)
            if period in seen:
                continue
            seen.add(period)
            keep.setdefault(manifest.id, []).append(f"{name} {period}")
    expire = [m for m in newest_first if m.id not in keep]
    return RetentionDecision(keep=keep, expire=expire)


@dataclass(frozen=True)
class TierStatus:
    """How many of its periods a tier holds a copy for, against the policy: the last ``policy``
    calendar periods up to now, fewer while the series is younger than that."""

    tier: str
    policy: int
    # Periods (of the last ``expected``) that hold a copy this tier keeps.
    held: int
    expected: int
    # Periods of the last ``expected`` without a copy.
    missing: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.missing


def tier_status(
    copies: Sequence[Manifest], rule: RetentionRule, now: dt.datetime
) -> list[TierStatus]:
    decision = apply_retention(copies, rule)
    first = min((m.finished for m in copies), default=None)
    found = []
    for name in TIERS:
        limit, period = getattr(rule, name), cadence(name)
        kept = {
            reason.split(" ", 1)[1]
            for reasons in decision.keep.values()
            for reason in reasons
            if reason.startswith(f"{name} ")
        }
        expected: list[str] = []
        moment = now
        while first is not None and len(expected) < limit:
            key = period.key_for(moment)
            start = period.start_of(moment.astimezone(dt.UTC))
            if start < period.start_of(first.astimezone(dt.UTC)):
                break  # the series is younger than the tier
            expected.append(key)
            moment = start - dt.timedelta(microseconds=1)
        missing = tuple(key for key in expected if key not in kept)
        found.append(TierStatus(name, limit, len(expected) - len(missing), len(expected), missing))
    return found
