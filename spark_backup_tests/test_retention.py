"""Retention rules, as pure logic over manifests."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from spark_backup.engine.manifest import Digest, Manifest
from spark_backup.engine.retention import RetentionRule, apply_retention, tier_status
from spark_backup.errors import PlanError
from spark_backup.plan import load_plan
from spark_backup_tests.helpers import config_source, plan_dict, run_cli, write_plan


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


def test_tier_status_proves_7_4_12_and_names_periods_without_a_copy() -> None:
    start = dt.datetime(2026, 1, 1, 2, tzinfo=dt.UTC)
    now = start + dt.timedelta(days=399, hours=5)
    copies = [_copy(start + dt.timedelta(days=d)) for d in range(400)]
    rule = RetentionRule(daily=7, weekly=4, monthly=12)
    tiers = {t.tier: t for t in tier_status(copies, rule, now)}
    assert [(t.held, t.expected, t.policy) for t in tiers.values()] == [
        (7, 7, 7),
        (4, 4, 4),
        (12, 12, 12),
    ]
    assert all(t.ok for t in tiers.values())

    # Two days without a backup: the daily tier reaches further back, and says which are gone.
    gaps = [
        m for m in copies if m.finished.date() not in {dt.date(2027, 2, 2), dt.date(2027, 2, 3)}
    ]
    daily = tier_status(gaps, rule, now)[0]
    assert daily.missing == ("2027-02-03", "2027-02-02") and daily.held == 5 and not daily.ok

    # A series ten days old is held to ten days, two weeks and one or two months.
    young = [_copy(now - dt.timedelta(days=d)) for d in range(10)]
    held = {t.tier: (t.held, t.expected) for t in tier_status(young, rule, now)}
    assert held["daily"] == (7, 7) and held["weekly"][0] == held["weekly"][1] <= 3
    assert tier_status([], rule, now)[0].expected == 0


def test_a_policy_of_zero_daily_copies_is_refused(tmp_path, age_key) -> None:
    plan = plan_dict([age_key[1]], [config_source("dgx_config", ["/etc"], retention={"daily": 0})])
    with pytest.raises(PlanError, match=r"sources\[0\].retention.daily: expected at least 1"):
        load_plan(write_plan(tmp_path, plan))


def test_prune_says_why_each_copy_is_kept_or_expired(local_plan) -> None:
    for _ in range(2):
        assert run_cli("--plan", str(local_plan), "backup", "dgx_config").returncode == 0
    copies = json.loads(run_cli("--plan", str(local_plan), "list", "--json", check=True).stdout)
    older, newer = (row["id"] for row in copies)
    dry = run_cli("--plan", str(local_plan), "prune", check=True).stdout
    assert f"kept {newer}: newest copy, daily " in dry
    assert f"would delete {older}: newer copies fill every daily" in dry


def test_the_newest_verified_copy_is_always_kept() -> None:
    now = dt.datetime(2026, 11, 27, tzinfo=dt.UTC)
    copies = [_copy(now - dt.timedelta(hours=h)) for h in range(4)]  # one day, newest first
    verified = {copies[2].id, copies[3].id}
    decision = apply_retention(copies, RetentionRule(1, 0, 0), verified)
    assert decision.keep == {
        copies[0].id: ["newest copy", "daily 2026-11-27"],
        copies[2].id: ["newest verified copy"],
    }
    assert [m.id for m in decision.expire] == [copies[1].id, copies[3].id]
    # The newest copy verified as well: nothing older needs keeping for it.
    both = apply_retention(copies, RetentionRule(1, 0, 0), {copies[0].id})
    assert both.keep[copies[0].id] == ["newest copy", "newest verified copy", "daily 2026-11-27"]
    assert len(both.expire) == 3


def test_prune_keeps_the_newest_copy_a_drill_restored(local_plan, age_key) -> None:
    plan = str(local_plan)
    run_cli("--plan", plan, "backup", "dgx_config", check=True)
    drilled = run_cli("--plan", plan, "drill", "dgx_config", "--identity", str(age_key[0]))
    assert drilled.returncode == 0, drilled.stderr
    for _ in range(2):
        run_cli("--plan", plan, "backup", "dgx_config", check=True)
    verified, middle, newest = (
        row["id"] for row in json.loads(run_cli("--plan", plan, "list", "--json").stdout)
    )
    dry = run_cli("--plan", plan, "prune", check=True).stdout
    assert f"kept {newest}: newest copy" in dry
    assert f"kept {verified}: newest verified copy" in dry
    assert f"would delete {middle}" in dry
    run_cli("--plan", plan, "prune", "--apply", check=True)
    left = [row["id"] for row in json.loads(run_cli("--plan", plan, "list", "--json").stdout)]
    assert left == [verified, newest]
    # The applied prune is journaled with why each copy stayed or went; the dry run is not.
    entries = [
        json.loads(line)
        for path in (local_plan.parent / "orchestration_journal").rglob("*.jsonl")
        for line in path.read_text().splitlines()
    ]
    [pruned] = [e for e in entries if e["event"] == "prune"]
    assert pruned["source"] == "dgx_config" and pruned["expired"] == [middle]
    assert pruned["kept"][verified] == ["newest verified copy"]
    assert pruned["kept"][newest][0] == "newest copy" and pruned["locked"] == []
