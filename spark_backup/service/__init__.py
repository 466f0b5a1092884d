"""The operations a plan supports, shared by the command line and the Dagster layer so both do
exactly the same thing; one module per concern, no Dagster imports:

- ``backup_service.py``: ``BackupService``, all the concerns below together;
- ``runtime.py``: the plan opened: stores, keys, sources, kinds, the catalog of copies;
- ``copies.py``: back up, verify, restore;
- ``retention.py``: prune;
- ``freshness.py``: the age of the newest copies;
- ``drills.py``: restore drills into staging, timed against the RTO, recorded beside the copy;
- ``notify.py``: the ticket desk (tickets and email for every failure);
- ``alerts.py``: stale copies, overdue or failed drills, log lag, sent through the desk;
- ``kpis.py``: last success, duration, volume, last drill per source;
- ``journal.py``: the orchestration journal, the task overview and the Definition of Done.
- ``secrets.py``: the secrets the plan names, their age and rotation;
- ``locks.py``: each copy's Object Lock, read back from the store;
- ``listing.py``: what ``list`` shows beside each copy (its lock, newest drill, replicas);
- ``compliance.py``: the deletion concept's yearly review;
- ``replication.py``: copies pushed to a second target, and the ``replicated`` check.

A kind's own operations (PostgreSQL's WAL, PITR, ...) live in its package and get the service
as their ``Runtime``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spark_backup.lazy import lazy_exports

if TYPE_CHECKING:
    from spark_backup.service.alerts import Alert
    from spark_backup.service.backup_service import BackupService
    from spark_backup.service.copies import VerifyOutcome
    from spark_backup.service.drills import DrillReport
    from spark_backup.service.freshness import Freshness
    from spark_backup.service.kpis import Kpi
    from spark_backup.service.locks import LockStatus
    from spark_backup.service.replication import ReplicaOutcome
    from spark_backup.service.retention import PruneReport
    from spark_backup.service.secrets import SecretStatus
    from spark_backup.sources.base import CopyRef

# Where each name lives. They load when first asked for: importing one concern
# (``service.runtime`` for a kind's own commands, such as ``wal-push`` for every WAL segment)
# does not import all the others, nor what they need (the ticket desk, drills, ...).
_HOMES = {
    "Alert": "spark_backup.service.alerts",
    "BackupService": "spark_backup.service.backup_service",
    "CopyRef": "spark_backup.sources.base",
    "DrillReport": "spark_backup.service.drills",
    "Freshness": "spark_backup.service.freshness",
    "Kpi": "spark_backup.service.kpis",
    "LockStatus": "spark_backup.service.locks",
    "PruneReport": "spark_backup.service.retention",
    "ReplicaOutcome": "spark_backup.service.replication",
    "SecretStatus": "spark_backup.service.secrets",
    "VerifyOutcome": "spark_backup.service.copies",
}

__getattr__ = lazy_exports(__name__, _HOMES, globals())


__all__ = [
    "Alert",
    "BackupService",
    "CopyRef",
    "DrillReport",
    "Freshness",
    "Kpi",
    "LockStatus",
    "PruneReport",
    "ReplicaOutcome",
    "SecretStatus",
    "VerifyOutcome",
]
