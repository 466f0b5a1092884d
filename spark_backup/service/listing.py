"""What ``list`` shows beside each copy: its Object Lock read back (``locks.py``), its newest
restore drill, and its replicas' records. Only that: ``list`` imports none of the service's
other concerns (writing and reading copies, drills, alerts, the ticket desk)."""

from __future__ import annotations

from spark_backup.engine.drill_record import DrillRecord, latest_drills
from spark_backup.engine.replication.records import ReplicaRecord, newest_records
from spark_backup.service.locks import LockOperations
from spark_backup.sources.base import CopyRef


class ListingOperations(LockOperations):
    def drills_of(self, refs: list[CopyRef]) -> dict[str, DrillRecord]:
        """The newest drill record of each of ``refs`` that was drilled, by copy id (one
        listing per store and source)."""
        found: dict[str, DrillRecord] = {}
        for store_name, source in sorted({(r.store.name, r.manifest.source) for r in refs}):
            store = next(r.store for r in refs if r.store.name == store_name)
            found.update(latest_drills(store, source))
        wanted = {r.manifest.id for r in refs}
        return {copy_id: record for copy_id, record in found.items() if copy_id in wanted}

    def replica_states(self, source_name: str) -> dict[str, dict[str, ReplicaRecord]]:
        """Per target, the newest record of each version (what ``list`` and the UI show)."""
        source = self.plan.source(source_name)
        store = self.store_for(source)
        return {name: newest_records(store, source_name, name) for name in source.replicate_to}
