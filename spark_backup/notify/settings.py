"""The plan's ``notifications`` section: where tickets go, who is emailed, where the ledger of
opened tickets and the queue of undelivered messages live. Credentials are named by
environment variable, never written in the plan."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from spark_backup.engine.settings import Duration, EnvName, SettingsModel

_INLINE_SECRETS = {"token": "token_env", "password": "password_env", "api_token": "token_env"}


def _refuse_inline_secrets(data: Any) -> Any:
    if isinstance(data, Mapping):
        for inline, ref in _INLINE_SECRETS.items():
            if inline in data:
                raise ValueError(
                    f"inline secret '{inline}' is not allowed; name the environment variable "
                    f"that holds it with '{ref}'"
                )
    return data


class TicketSettings(SettingsModel):
    """``outbox``: JSON lines in the state folder (the embedded default); ``webhook``: a JSON
    POST to ``url``; ``jira``: Jira REST v2 at ``url`` in ``project``; ``github``: GitHub issues
    in ``repository`` through the REST API at ``url`` (``https://api.github.com``)."""

    backend: Literal["outbox", "webhook", "jira", "github"] = "outbox"
    url: str | None = Field(None, pattern=r"^https?://")
    project: str | None = None
    issue_type: str = "Task"
    # GitHub: OWNER/NAME.
    repository: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
    # Jira: basic auth as ``user`` with the token (or password) in ``token_env``; without a
    # user, the token is sent as a bearer token (Jira personal access tokens, webhooks).
    user: str | None = None
    token_env: EnvName | None = None
    labels: list[str] = Field(default_factory=lambda: ["spark-backup"])
    timeout: Duration = dt.timedelta(seconds=10)

    _secrets = model_validator(mode="before")(_refuse_inline_secrets)

    @model_validator(mode="after")
    def _backend_needs(self) -> TicketSettings:
        if self.backend != "outbox" and not self.url:
            raise ValueError(f"tickets backend {self.backend} needs url")
        if self.backend == "jira" and not self.project:
            raise ValueError("tickets backend jira needs project (a project key)")
        if self.backend == "github" and not self.repository:
            raise ValueError("tickets backend github needs repository (OWNER/NAME)")
        return self


class EmailSettings(SettingsModel):
    """SMTP to the security team."""

    host: str = "127.0.0.1"
    port: int = Field(25, ge=1, le=65535)
    sender: str
    to: list[str] = Field(min_length=1)
    starttls: bool = False
    user: str | None = None
    password_env: EnvName | None = None
    timeout: Duration = dt.timedelta(seconds=10)
    # Mail when a ticket is opened; with this, also at every recurrence (a stale copy fails its
    # freshness check every 30 minutes: that is a comment each time, and a mail only if asked).
    every_occurrence: bool = False

    _secrets = model_validator(mode="before")(_refuse_inline_secrets)


class ChatSettings(SettingsModel):
    """A Slack- or Teams-compatible incoming webhook: a JSON POST of ``{"text": ...}``."""

    url: str = Field(pattern=r"^https?://")
    # The webhook URL is often the secret itself; a bearer token, if the receiver wants one.
    token_env: EnvName | None = None
    timeout: Duration = dt.timedelta(seconds=10)

    _secrets = model_validator(mode="before")(_refuse_inline_secrets)


class Notifications(SettingsModel):
    # The ledger of opened tickets, the queue of undelivered messages and the outbox backend's
    # tickets; relative to the plan file.
    state_dir: str = ".spark_backup/notifications"
    tickets: TicketSettings = TicketSettings.default_instance()
    email: EmailSettings | None = None
    # The security team's chat channel, told when a ticket opens (like the mail).
    chat: ChatSettings | None = None
