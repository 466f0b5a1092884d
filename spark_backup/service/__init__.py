"""The operations a plan supports, shared by the command line and the Dagster layer so both do
exactly the same thing; one module per concern, no Dagster imports:

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
- ``compliance.py``: the deletion concept's yearly review;
- ``replication.py``: copies pushed to a second target, and the ``replicated`` check.

A kind's own operations (PostgreSQL's WAL, PITR, ...) live in its package and get the service
as their ``Runtime``.
"""

from spark_backup.service.alerts import Alert, AlertOperations
from spark_backup.service.compliance import ComplianceOperations
from spark_backup.service.copies import CopyOperations, VerifyOutcome
from spark_backup.service.drills import DrillReport
from spark_backup.service.freshness import Freshness
from spark_backup.service.kpis import Kpi, KpiOperations
from spark_backup.service.locks import LockStatus
from spark_backup.service.replication import ReplicaOutcome, ReplicationOperations
from spark_backup.service.retention import PruneReport, RetentionOperations
from spark_backup.service.secrets import SecretsOperations, SecretStatus
from spark_backup.sources.base import CopyRef


class BackupService(
    CopyOperations,
    RetentionOperations,
    KpiOperations,
    AlertOperations,
    SecretsOperations,
    ComplianceOperations,
    ReplicationOperations,
):
    """A plan's operations, all concerns together (alerts bring freshness, drills and the
    ticket desk)."""


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
