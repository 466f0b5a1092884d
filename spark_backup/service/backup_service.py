"""``BackupService``: every concern of the service together, for the command line and the
Dagster layer."""

from spark_backup.service.alerts import AlertOperations
from spark_backup.service.compliance import ComplianceOperations
from spark_backup.service.copies import CopyOperations
from spark_backup.service.disaster import DisasterOperations
from spark_backup.service.kpis import KpiOperations
from spark_backup.service.listing import ListingOperations
from spark_backup.service.replication import ReplicationOperations
from spark_backup.service.retention import RetentionOperations
from spark_backup.service.secrets import SecretsOperations


class BackupService(
    CopyOperations,
    ListingOperations,
    RetentionOperations,
    KpiOperations,
    AlertOperations,
    DisasterOperations,
    SecretsOperations,
    ComplianceOperations,
    ReplicationOperations,
):
    """A plan's operations, all concerns together (alerts bring freshness, drills and the
    ticket desk)."""
