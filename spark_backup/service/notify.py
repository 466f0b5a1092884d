"""Notifications: the plan's ticket desk (tickets and email for every failure)."""

from __future__ import annotations

from spark_backup.notify import TicketDesk
from spark_backup.service.runtime import PlanRuntime


class NotifyOperations(PlanRuntime):
    def ticket_desk(self) -> TicketDesk:
        settings = self.plan.notifications
        return TicketDesk(settings, self.loaded.resolve(settings.state_dir))
