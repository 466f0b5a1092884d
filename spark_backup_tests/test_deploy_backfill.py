"""A backfill at the scale issue 14 names, through the production stack of
test_deploy_postgres.py (its queries and run helpers are imported from there): a
PostgreSQL-backed instance made by ``spark-backup dagster-init --postgres``, a code server,
``dagster-webserver`` and ``dagster-daemon`` as separate processes, the queued coordinator with
a global limit below the number of sources and one pool per source.

An operator backfills each of the 3 sources over every daily partition from its asset page.
Every partition of every source is materialized exactly once, by a run of its own that
succeeded; no two runs of one source overlapped (the pools); never more runs at once than the
global limit.

Each run is a process of its own (Dagster's default run launcher) that imports Dagster and this
package and forks its step, so the cost is per run, not per byte: the sources are tiny
configuration trees. It runs with ``SPARK_BACKUP_FULL_BACKFILL=1`` (the default suite keeps to
test_deploy_postgres.py's smaller backfills, which also kill the daemon): 2 partitions x 3
sources (6 runs) and the full 30 x 3 (90 runs), whose time is in docs/scaling.md.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import Counter
from pathlib import Path

import pytest

from spark_backup.defs.drills import DRILL_SENSOR
from spark_backup_tests.test_deploy_postgres import (
    BACKFILL,
    BACKFILL_STATUS,
    DONE_BACKFILL,
    GLOBAL_LIMIT,
    MATERIALIZATIONS,
    RUNS,
    SOURCES,
    _source_of,
    _tag,
    production_stack,
)

FULL_ENV = "SPARK_BACKUP_FULL_BACKFILL"
SENSOR = """query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) {
  __typename ... on Sensor { id } } }"""
STOP_SENSOR = """mutation($id: String!) { stopSensor(id: $id) {
  __typename ... on StopSensorMutationResult { instigationState { status } } } }"""
# Seconds a run may take on average before the backfill counts as stuck: a run takes ~60 s on
# this 2-core host under a load average of 15 (seconds when quiet).
SECONDS_PER_RUN = 90


# The default suite's production-stack test is test_deploy_postgres.py (backfills of every
# source, the daemon killed in the middle): this one only adds scale, so it runs on request.
@pytest.mark.parametrize(
    "partitions",
    [
        pytest.param(2, marks=pytest.mark.timeout(120 + SECONDS_PER_RUN * 6)),
        pytest.param(30, marks=pytest.mark.timeout(120 + SECONDS_PER_RUN * 90)),
    ],
)
@pytest.mark.skipif(not os.environ.get(FULL_ENV), reason=f"backfill at scale: set {FULL_ENV}=1")
def test_a_backfill_of_every_source_materializes_each_partition_once_within_the_limits(
    tmp_path: Path, partitions: int
) -> None:
    started = time.monotonic()
    with production_stack(tmp_path, partitions, GLOBAL_LIMIT) as stack:
        server = stack.server
        # Every new copy would also start a drill run (drill_new_copies, tested in
        # test_dagster_dev.py), doubling the runs: stopped, as from the sensor's page.
        selector = {
            "repositoryLocationName": "spark_backup",
            "repositoryName": "__repository__",
            "sensorName": DRILL_SENSOR,
        }
        sensor = server.query(SENSOR, {"s": selector})["sensorOrError"]
        assert sensor["__typename"] == "Sensor", sensor
        stopped = server.query(STOP_SENSOR, {"id": sensor["id"]})["stopSensor"]
        assert stopped["instigationState"]["status"] == "STOPPED", stopped
        backfills = []
        for name in SOURCES:
            launched = server.query(
                BACKFILL,
                {
                    "p": {
                        "partitionNames": stack.partitions,
                        "assetSelection": [{"path": ["backups", name]}],
                    }
                },
            )["launchPartitionBackfill"]
            assert launched["__typename"] == "LaunchBackfillSuccess", launched
            backfills.append(launched["backfillId"])

        expected_runs = len(SOURCES) * partitions
        deadline = time.monotonic() + 60 + SECONDS_PER_RUN * expected_runs
        while not all(
            server.query(BACKFILL_STATUS, {"id": backfill})["partitionBackfillOrError"]["status"]
            in DONE_BACKFILL
            for backfill in backfills
        ):
            assert time.monotonic() < deadline, (stack.home / "daemon.log").read_text()[-3000:]
            time.sleep(2)
        finished = [
            run
            for backfill in backfills
            for run in server.query(RUNS, {"id": backfill})["runsOrError"]["results"]
        ]
        assert Counter(r["status"] for r in finished) == {"SUCCESS": expected_runs}, finished

        for name in SOURCES:
            events = server.query(MATERIALIZATIONS, {"key": {"path": ["backups", name]}})[
                "assetOrError"
            ]["assetMaterializations"]
            mine = [r for r in finished if _source_of(r) == name]
            # Exactly once: every partition, none twice, each by one of this source's runs.
            assert sorted(e["partition"] for e in events) == stack.partitions, name
            assert sorted(_tag(r, "dagster/partition") for r in mine) == stack.partitions
            assert sorted(e["runId"] for e in events) == sorted(r["runId"] for r in mine)

        spans = [(r["startTime"], r["endTime"], _source_of(r)) for r in finished]
        for name in SOURCES:
            # Runs of one source, in start order, each started after the previous one ended.
            own = sorted((start, end) for start, end, source in spans if source == name)
            overlapping = [(a, b) for a, b in itertools.pairwise(own) if b[0] < a[1]]
            assert not overlapping, f"runs of {name} overlapped: {overlapping}"
        peak = max(sum(1 for s, e, _ in spans if s <= start < e) for start, _, _ in spans)
        assert peak <= GLOBAL_LIMIT, f"{peak} runs at once, limit {GLOBAL_LIMIT}"
        # Runs of different sources did run side by side: a pool holds back its own source only.
        assert peak > 1, "the runs never overlapped: the queue ran one at a time"
    print(f"\n{expected_runs} runs in {time.monotonic() - started:.0f} s (peak {peak} at once)")
