"""Where tickets and messages go: the outbox (JSON lines, the embedded default), a generic
webhook, Jira REST v2, and SMTP. Each raises ``DeliveryError`` with one line that names the
endpoint and never a credential; ``rejected`` tells a refused credential from a down service."""

from __future__ import annotations

import base64
import json
import os
import urllib.parse
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from spark_backup.notify.settings import ChatSettings, EmailSettings, TicketSettings


class DeliveryError(Exception):
    def __init__(self, message: str, rejected: bool = False):
        super().__init__(message)
        self.rejected = rejected


def _secret(env: str | None, what: str) -> str | None:
    if env is None:
        return None
    value = os.environ.get(env)
    if not value:
        raise DeliveryError(f"{what}: environment variable {env} is not set", rejected=True)
    return value


class TicketBackend(ABC):
    name: str

    @abstractmethod
    def open(self, title: str, body: str, labels: list[str]) -> str:
        """Open a ticket; return its reference (``OPS-12``)."""

    @abstractmethod
    def comment(self, ticket: str, body: str) -> None:
        """Add a comment to an open ticket (the failure recurred)."""


class OutboxBackend(TicketBackend):
    """Tickets as JSON lines in a file, for installations without a ticket system (and for
    anyone to read or forward)."""

    name = "outbox"

    def __init__(self, path: Path):
        self.path = path

    def _append(self, entry: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")

    def open(self, title: str, body: str, labels: list[str]) -> str:
        opened = 0
        if self.path.exists():
            with open(self.path, encoding="utf-8") as handle:
                opened = sum(1 for line in handle if '"action": "open"' in line)
        ticket = f"OUTBOX-{opened + 1}"
        self._append(
            {"action": "open", "ticket": ticket, "title": title, "body": body, "labels": labels}
        )
        return ticket

    def comment(self, ticket: str, body: str) -> None:
        self._append({"action": "comment", "ticket": ticket, "body": body})


def post_json(
    name: str,
    url: str,
    payload: dict[str, Any],
    headers: dict[str, str],
    timeout: float,
    shown_url: str | None = None,
) -> dict[str, Any]:
    """POST ``payload``; the answer's JSON (or ``{}``). Errors name ``shown_url`` (default
    ``url``), never the headers."""
    import urllib.error  # what sends loads these; listing, archiving WAL never do (issue 12)
    import urllib.request

    shown = shown_url or url
    request = urllib.request.Request(
        url,
        json.dumps(payload).encode("utf-8"),
        {"Content-Type": "application/json", "Accept": "application/json", **headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise DeliveryError(
            f"{name} at {shown} answered HTTP {exc.code} {exc.reason}",
            rejected=exc.code in (401, 403),
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DeliveryError(f"{name} at {shown} not reachable: {reason}") from None
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {}


class _HttpBackend(TicketBackend):
    def __init__(self, settings: TicketSettings):
        assert settings.url is not None
        self.settings = settings
        self.base = settings.url.rstrip("/")

    def _headers(self) -> dict[str, str]:
        token = _secret(self.settings.token_env, f"{self.name} tickets")
        if token and self.settings.user:
            pair = f"{self.settings.user}:{token}".encode()
            return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _post(self, url: str, payload: dict[str, Any]) -> dict[str, Any]:
        return post_json(
            self.name,
            url,
            payload,
            self._headers(),
            self.settings.timeout.total_seconds(),
            shown_url=self._shown(url),
        )

    def _shown(self, url: str) -> str:
        return url


class WebhookBackend(_HttpBackend):
    """A JSON POST per ticket action to ``url``; the receiver may answer ``{"id": ...}`` to name
    the ticket, else the dedup key names it."""

    name = "webhook"

    def _shown(self, url: str) -> str:
        # A webhook's URL often carries its secret: errors name the host only.
        return f"{urllib.parse.urlsplit(url).netloc} (URL not shown)"

    def open(self, title: str, body: str, labels: list[str]) -> str:
        answer = self._post(
            self.base, {"action": "open", "title": title, "body": body, "labels": labels}
        )
        return str(answer.get("id") or answer.get("key") or title)

    def comment(self, ticket: str, body: str) -> None:
        self._post(self.base, {"action": "comment", "ticket": ticket, "body": body})


class JiraBackend(_HttpBackend):
    """Jira Data Center / Server REST v2: ``POST /rest/api/2/issue`` and ``.../comment``."""

    name = "jira"

    def open(self, title: str, body: str, labels: list[str]) -> str:
        answer = self._post(
            f"{self.base}/rest/api/2/issue",
            {
                "fields": {
                    "project": {"key": self.settings.project},
                    "issuetype": {"name": self.settings.issue_type},
                    "summary": title,
                    "description": body,
                    "labels": labels,
                }
            },
        )
        if "key" not in answer:
            raise DeliveryError(f"jira at {self.base} answered without an issue key")
        return str(answer["key"])

    def comment(self, ticket: str, body: str) -> None:
        self._post(f"{self.base}/rest/api/2/issue/{ticket}/comment", {"body": body})


def ticket_backend(settings: TicketSettings, outbox: Path) -> TicketBackend:
    if settings.backend == "jira":
        return JiraBackend(settings)
    if settings.backend == "webhook":
        return WebhookBackend(settings)
    return OutboxBackend(outbox)


def send_chat(settings: ChatSettings, text: str) -> None:
    """One message to a Slack- or Teams-compatible incoming webhook. The URL may carry the
    webhook's secret, so errors name only its host."""
    token = _secret(settings.token_env, "chat webhook")
    host = urllib.parse.urlsplit(settings.url).netloc
    post_json(
        "chat webhook",
        settings.url,
        {"text": text},
        {"Authorization": f"Bearer {token}"} if token else {},
        settings.timeout.total_seconds(),
        shown_url=f"{host} (URL not shown)",
    )


def send_email(settings: EmailSettings, subject: str, body: str) -> None:
    """One plain-text message to the security team."""
    import smtplib
    import ssl
    from email.message import EmailMessage

    message = EmailMessage()
    message["From"] = settings.sender
    message["To"] = ", ".join(settings.to)
    message["Subject"] = subject
    message.set_content(body)
    where = f"SMTP {settings.host}:{settings.port}"
    password = _secret(settings.password_env, where)
    try:
        with smtplib.SMTP(
            settings.host, settings.port, timeout=settings.timeout.total_seconds()
        ) as smtp:
            if settings.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if settings.user and password:
                smtp.login(settings.user, password)
            smtp.send_message(message)
    except smtplib.SMTPAuthenticationError as exc:
        raise DeliveryError(f"{where} refused the login: {exc.smtp_code}", rejected=True) from None
    except (TimeoutError, smtplib.SMTPException, OSError) as exc:
        raise DeliveryError(f"{where} failed: {type(exc).__name__}: {exc}") from None
