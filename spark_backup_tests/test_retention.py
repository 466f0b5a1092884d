"""Retention rules, as pure logic over manifests."""

from __future__ import annotations

import datetime as dt

from spark_backup.engine.manifest import Digest, Manifest
from spark_backup.engine.retention import RetentionRule, apply_retention


def _copy(finished: dt.datetime, n: int = 0) -> Manifest:
    stamp = finished.isoformat()
    return Manifest(
        id=f"src-{finished:%Y%m%dT%H%M%SZ}-{n:08x}",
        source="src",
        kind="config_archive",
        partition=finished.date().isoformat(),
        store="local",
        data_key="k",
        layers=["age", "zstd", "tar"],
        started_at=stamp,
        finished_at=stamp,
        plaintext=Digest("a", 1),
        stored=Digest("b", 1),
        compression={},
        encryption={},
        tools={},
        host="h",
    )


def test_gfs_keeps_newest_per_day_week_month() -> None:
    start = dt.datetime(2026, 1, 1, 2, tzinfo=dt.UTC)
    copies = [_copy(start + dt.timedelta(days=d)) for d in range(400)]
    copies += [_copy(start + dt.timedelta(days=399, hours=3), 1)]  # a re-run on the last day
    decision = apply_retention(copies, RetentionRule(daily=7, weekly=4, monthly=12))
    kept = sorted(decision.keep)
    newest = max(copies, key=lambda m: m.finished_at)
    assert newest.id in decision.keep and "newest copy" in decision.keep[newest.id]
    daily = [i for i, r in decision.keep.items() if any(x.startswith("daily") for x in r)]
    weekly = [i for i, r in decision.keep.items() if any(x.startswith("weekly") for x in r)]
    monthly = [i for i, r in decision.keep.items() if any(x.startswith("monthly") for x in r)]
    assert (len(daily), len(weekly), len(monthly)) == (7, 4, 12)
    # On the last day only the newer of the two copies is kept.
    assert _copy(start + dt.timedelta(days=399)).id not in decision.keep
    assert len(kept) + len(decision.expire) == len(copies)
    assert (
        len(kept) < 7 + 4 + 12
    )  # periods overlap: the newest day is also the newest week and month


def test_zero_retention_still_keeps_the_newest_copy() -> None:
    now = dt.datetime(2026, 11, 27, tzinfo=dt.UTC)
    copies = [_copy(now - dt.timedelta(days=d)) for d in range(3)]
    decision = apply_retention(copies, RetentionRule(0, 0, 0))
    assert list(decision.keep) == [copies[0].id]
    assert [m.id for m in decision.expire] == [copies[1].id, copies[2].id]


def test_empty() -> None:
    assert apply_retention([], RetentionRule(7, 4, 12)).expire == []
