"""The ticket desk: one ticket per failure, commented on when it recurs, and the security team
emailed; nothing lost when a backend is down.

A failure is known by its dedup key (source, partition, check): the first report opens a ticket
and mails the security team, a later one comments on it (and mails only with
``email.every_occurrence``). Each report names the event it comes from (a run id, an event's
storage id), and an event already reported is ignored, so a sensor that evaluates the same
event twice opens nothing twice. What cannot be delivered (the ticket system is down, or refused
the credentials) is queued and retried on every later report or ``retry``; a refused credential
is said once, not at every retry.

State, in the plan's ``notifications.state_dir`` (under an exclusive file lock, rewritten
atomically)::

    ledger.json     dedup key -> ticket, occurrences, event ids; the pending queue
    outbox.jsonl    the outbox backend's tickets (and nothing else)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spark_backup.engine.cadence import utcnow
from spark_backup.notify.backends import DeliveryError, send_chat, send_email, ticket_backend
from spark_backup.notify.settings import Notifications

LEDGER = "ledger.json"
OUTBOX = "outbox.jsonl"
# The check name of a failed run (not of one check).
RUN_FAILED = "run"
# At most this many event ids are remembered per failure (the newest).
EVENTS_KEPT = 200


@dataclass(frozen=True)
class Failure:
    """Something that needs a person: a failed run, a failed check, a failed drill."""

    source: str
    partition: str
    check: str
    event: str  # the run id or event storage id it was seen in: reporting it again is a no-op
    summary: str
    detail: str = ""
    link: str = ""

    @property
    def key(self) -> str:
        return f"{self.source}/{self.partition or '-'}/{self.check}"

    def title(self) -> str:
        return f"spark-backup: {self.check} failed for {self.source} ({self.partition or 'no partition'})"

    def body(self) -> str:
        lines = [self.summary]
        if self.detail:
            lines += ["", self.detail]
        lines += ["", f"source: {self.source}", f"partition: {self.partition or '-'}"]
        lines += [f"check: {self.check}", f"event: {self.event}"]
        if self.link:
            lines.append(f"details: {self.link}")
        return "\n".join(lines)


@dataclass
class Outcome:
    """What one report did: ``opened``, ``commented``, ``queued`` or ``duplicate``."""

    action: str
    ticket: str | None = None
    emailed: bool = False
    chatted: bool = False
    # Something to say once (a backend down or refusing credentials), else None.
    warning: str | None = None
    delivered: list[str] = field(default_factory=list)


class TicketDesk:
    def __init__(self, settings: Notifications, state_dir: Path):
        self.settings = settings
        self.state_dir = state_dir
        self.backend = ticket_backend(settings.tickets, state_dir / OUTBOX)

    # --- state -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / LEDGER
        with open(self.state_dir / ".ledger.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = json.loads(path.read_text()) if path.exists() else {}
            state.setdefault("tickets", {})
            state.setdefault("pending", [])
            state.setdefault("said", [])
            yield state
            temporary = path.with_suffix(".tmp")
            temporary.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
            os.replace(temporary, path)

    def tickets(self) -> dict[str, Any]:
        with self._state() as state:
            return dict(state["tickets"])

    def pending(self) -> list[dict[str, Any]]:
        with self._state() as state:
            return list(state["pending"])

    # --- reporting ------------------------------------------------------------------------------

    def report(self, failure: Failure) -> Outcome:
        with self._state() as state:
            delivered = self._retry(state)
            entry = state["tickets"].get(failure.key)
            if entry and failure.event in entry["events"]:
                return Outcome("duplicate", entry.get("ticket"), delivered=delivered)
            now = utcnow().isoformat()
            if entry is None:
                entry = {"ticket": None, "opened_at": now, "occurrences": 0, "events": []}
                state["tickets"][failure.key] = entry
                action = "open"
            else:
                action = "comment"
            entry["occurrences"] += 1
            entry["last_at"] = now
            entry["events"] = [*entry["events"], failure.event][-EVENTS_KEPT:]
            outcome = Outcome("opened" if action == "open" else "commented", delivered=delivered)
            message = {"failure": asdict(failure), "action": action}
            # A ticket still waiting to be opened gets its comments after it.
            if action == "comment" and entry["ticket"] is None:
                warning = self._queue(state, {"kind": "ticket", **message}, None)
                outcome.action, outcome.warning = "queued", warning
            else:
                try:
                    ticket = self._deliver_ticket(action, failure, entry["ticket"])
                    entry["ticket"] = ticket
                    outcome.ticket = ticket
                except DeliveryError as exc:
                    outcome.action = "queued"
                    outcome.warning = self._queue(state, {"kind": "ticket", **message}, exc)
            outcome.ticket = entry["ticket"]
            email = self.settings.email
            if email is not None and (action == "open" or email.every_occurrence):
                try:
                    self._deliver_email(failure, entry["ticket"])
                    outcome.emailed = True
                except DeliveryError as exc:
                    warning = self._queue(state, {"kind": "email", **message}, exc)
                    outcome.warning = outcome.warning or warning
            if self.settings.chat is not None and action == "open":
                try:
                    self._deliver_chat(failure, entry["ticket"])
                    outcome.chatted = True
                except DeliveryError as exc:
                    warning = self._queue(state, {"kind": "chat", **message}, exc)
                    outcome.warning = outcome.warning or warning
            return outcome

    def preview(self, failure: Failure) -> str:
        """What ``report`` would do, changing nothing."""
        with self._state() as state:
            entry = state["tickets"].get(failure.key)
        target = self.backend.name
        if entry and failure.event in entry["events"]:
            return f"nothing (already reported in {entry.get('ticket') or 'the queue'})"
        if entry and entry.get("ticket"):
            action = f"comment on ticket {entry['ticket']} ({target})"
        else:
            action = f"open a ticket ({target}): {failure.title()}"
        email = self.settings.email
        return action + (f"; email {', '.join(email.to)}" if email else "")

    def retry(self) -> list[str]:
        """Deliver what is queued; return what was delivered, one line each."""
        with self._state() as state:
            return self._retry(state)

    def _retry(self, state: dict[str, Any]) -> list[str]:
        delivered, still = [], []
        blocked: set[str] = set()  # a ticket not yet opened: its comments wait behind it
        for item in state["pending"]:
            failure = Failure(**item["failure"])
            entry = state["tickets"].setdefault(failure.key, {"ticket": None, "events": []})
            if item["kind"] == "ticket" and failure.key in blocked:
                still.append(item)
                continue
            try:
                if item["kind"] == "email":
                    self._deliver_email(failure, entry.get("ticket"))
                    delivered.append(f"email about {failure.key}")
                elif item["kind"] == "chat":
                    self._deliver_chat(failure, entry.get("ticket"))
                    delivered.append(f"chat message about {failure.key}")
                else:
                    action = "open" if entry.get("ticket") is None else "comment"
                    ticket = self._deliver_ticket(action, failure, entry.get("ticket"))
                    entry["ticket"] = ticket
                    delivered.append(f"ticket {ticket} ({action}) for {failure.key}")
            except DeliveryError as exc:
                item["attempts"] = item.get("attempts", 0) + 1
                item["last_error"] = str(exc)
                still.append(item)
                if item["kind"] == "ticket" and entry.get("ticket") is None:
                    blocked.add(failure.key)
        state["pending"] = still
        if not still:
            state["said"] = []  # a later outage is said again
        return delivered

    def _queue(self, state: dict[str, Any], item: dict[str, Any], exc: DeliveryError | None):
        """Queue an undelivered message; the reason is returned once per reason."""
        state["pending"].append({**item, "attempts": 1, "last_error": str(exc) if exc else None})
        if exc is None:
            return None
        reason = str(exc)
        if reason in state["said"]:
            return None
        state["said"].append(reason)
        verdict = "refused the credentials" if exc.rejected else "is unavailable"
        return f"{reason}: {self.backend.name if item['kind'] == 'ticket' else item['kind']} {verdict}; queued in {self.state_dir / LEDGER}, retried on every later report"

    def _deliver_ticket(self, action: str, failure: Failure, ticket: str | None) -> str:
        if action == "open" or ticket is None:
            return self.backend.open(
                failure.title(), failure.body(), list(self.settings.tickets.labels)
            )
        self.backend.comment(ticket, f"Recurred.\n\n{failure.body()}")
        return ticket

    def _deliver_chat(self, failure: Failure, ticket: str | None) -> None:
        assert self.settings.chat is not None
        suffix = f" [{ticket}]" if ticket else ""
        send_chat(self.settings.chat, f"{failure.title()}{suffix}\n{failure.summary}")

    def _deliver_email(self, failure: Failure, ticket: str | None) -> None:
        assert self.settings.email is not None
        subject = failure.title() + (f" [{ticket}]" if ticket else "")
        send_email(self.settings.email, subject, failure.body())
