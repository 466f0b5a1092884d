"""Where tickets and messages go: the outbox (JSON lines, the embedded default), a generic
webhook, Jira REST v2, GitHub issues (REST), and SMTP. Each raises ``DeliveryError`` with one line that names the
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
    answer = request_json(name, "POST", url, payload, headers, timeout, shown_url)
    return answer if isinstance(answer, dict) else {}


def request_json(
    name: str,
    method: str,
    url: str,
    payload: dict[str, Any] | None,
    headers: dict[str, str],
    timeout: float,
    shown_url: str | None = None,
) -> Any:
    """One HTTP request with a JSON body (or none); the answer's JSON (``{}`` if empty or not
    JSON). Errors name ``shown_url`` (default ``url``), never the headers."""
    import urllib.error  # what sends loads these; listing, archiving WAL never do (issue 12)
    import urllib.request

    shown = shown_url or url
    request = urllib.request.Request(
        url,
        json.dumps(payload).encode("utf-8") if payload is not None else None,
        {"Content-Type": "application/json", "Accept": "application/json", **headers},
        method=method,
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


class GitHubBackend(_HttpBackend):
    """GitHub issues through the REST API (``url`` is the API root: ``https://api.github.com``
    or GitHub Enterprise's ``https://HOST/api/v3``), authenticated with a token as a bearer.

    A failure's title is its stable dedup key (source, partition, check): the desk's ledger
    deduplicates, and so does GitHub itself, so that a lost ledger (a new machine, a fresh pod)
    never opens a second issue: before opening, the open issues with the plan's labels are
    searched for the same title, and a match is commented on instead."""

    name = "github"
    # Open issues with the labels looked through before opening one (100 a page).
    MAX_PAGES = 10

    def _headers(self) -> dict[str, str]:
        token = _secret(self.settings.token_env, "github tickets")
        return {
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        }

    @property
    def _issues(self) -> str:
        return f"{self.base}/repos/{self.settings.repository}/issues"

    def _get(self, url: str) -> Any:
        return request_json(
            self.name, "GET", url, None, self._headers(), self.settings.timeout.total_seconds()
        )

    def find(self, title: str, labels: list[str]) -> int | None:
        """The number of an open issue with this title and the labels, if there is one."""
        query = {"state": "open", "per_page": "100"}
        if labels:
            query["labels"] = ",".join(labels)
        for page in range(1, self.MAX_PAGES + 1):
            found = self._get(f"{self._issues}?{urllib.parse.urlencode({**query, 'page': page})}")
            if not isinstance(found, list):
                raise DeliveryError(f"github at {self.base} answered the issue list without a list")
            for issue in found:
                # The issues API lists pull requests too; they are never tickets.
                if issue.get("title") == title and "pull_request" not in issue:
                    return int(issue["number"])
            if len(found) < 100:
                return None
        return None

    def open(self, title: str, body: str, labels: list[str]) -> str:
        existing = self.find(title, labels)
        if existing is not None:
            ticket = f"{self.settings.repository}#{existing}"
            self.comment(ticket, f"Recurred (the issue was already open).\n\n{body}")
            return ticket
        answer = self._post(self._issues, {"title": title, "body": body, "labels": labels})
        if "number" not in answer:
            raise DeliveryError(f"github at {self.base} answered without an issue number")
        return f"{self.settings.repository}#{answer['number']}"

    def comment(self, ticket: str, body: str) -> None:
        number = ticket.rpartition("#")[2]
        self._post(f"{self._issues}/{number}/comments", {"body": body})


def ticket_backend(settings: TicketSettings, outbox: Path) -> TicketBackend:
    if settings.backend == "jira":
        return JiraBackend(settings)
    if settings.backend == "github":
        return GitHubBackend(settings)
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
