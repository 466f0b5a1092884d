"""Notifications: the plan's ticket desk (tickets and email for every failure), each failure
and what was done about it journaled."""

from __future__ import annotations

from spark_backup.notify import Failure, Outcome, TicketDesk
from spark_backup.service.journal import JournalOperations


class NotifyOperations(JournalOperations):
    def ticket_desk(self) -> TicketDesk:
        settings = self.plan.notifications
        return TicketDesk(settings, self.loaded.resolve(settings.state_dir))

    def report_failure(self, failure: Failure, desk: TicketDesk | None = None) -> Outcome:
        """Open or comment on the failure's ticket, email the security team, and journal both
        (a failure already reported is neither sent nor journaled again)."""
        outcome = (desk or self.ticket_desk()).report(failure)
        if outcome.action != "duplicate":
            self.journal_event(
                "failure",
                source=failure.source,
                partition=failure.partition,
                check=failure.check,
                summary=failure.summary,
                event_id=failure.event,
            )
            self.journal_event(
                "ticket",
                source=failure.source,
                partition=failure.partition,
                check=failure.check,
                action=outcome.action,
                ticket=outcome.ticket,
                emailed=outcome.emailed,
            )
        return outcome
