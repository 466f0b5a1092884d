"""Real servers for the notification tests, each on a free port of 127.0.0.1: an SMTP server
(aiosmtpd, with a login), a Jira Data Center REST v2 server (jira820) and a webhook receiver
(http.server), each recording what it received."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from spark_backup_tests.helpers import free_port

SMTP_USER = "spark"
SMTP_PASSWORD = "s3cret-smtp-password"


@dataclass
class Mailbox:
    port: int
    messages: list[Any] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        if isinstance(auth_data, LoginPassword):
            login = (auth_data.login.decode(), auth_data.password.decode())
            self.logins.append(login)
            return AuthResult(success=login == (SMTP_USER, SMTP_PASSWORD))
        return AuthResult(success=False)


@contextmanager
def smtp_server() -> Iterator[Mailbox]:
    box = Mailbox(free_port())
    controller = Controller(
        box,
        hostname="127.0.0.1",
        port=box.port,
        authenticator=box.authenticate,
        auth_require_tls=False,
    )
    controller.start()
    try:
        yield box
    finally:
        controller.stop()


@dataclass
class Jira:
    url: str

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as response:
            return json.load(response)

    def issues(self, label: str) -> list[dict[str, Any]]:
        query = urllib.parse.quote(f"labels = {label}")
        return self.get(f"/rest/api/2/search?jql={query}&maxResults=100")["issues"]


@contextmanager
def jira_server(log_dir: Path) -> Iterator[Jira]:
    """``JIRA820_PORT=PORT jira820``, as its documentation starts it."""
    port = free_port()
    jira = Jira(f"http://127.0.0.1:{port}")
    log = open(log_dir / "jira820.log", "wb")  # noqa: SIM115 - closed after the process
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "jira820")],
        env={**os.environ, "JIRA820_PORT": str(port), "JIRA820_HOST": "127.0.0.1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                jira.get("/rest/api/2/serverInfo")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"jira820 did not start: {(log_dir / 'jira820.log').read_text()[-2000:]}"
                    ) from None
                time.sleep(0.2)
        yield jira
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@dataclass
class Webhook:
    url: str
    received: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    # The status it answers with (401 to refuse the credentials, 503 to be down).
    status: int = 200


@contextmanager
def webhook_server() -> Iterator[Webhook]:
    port = free_port()
    hook = Webhook(f"http://127.0.0.1:{port}/hook")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if hook.status != 200:
                self.send_response(hook.status)
                self.end_headers()
                return
            payload = json.loads(body)
            hook.received.append(payload)
            hook.headers.append(dict(self.headers))
            answer = json.dumps({"id": f"HOOK-{len(hook.received)}"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hook
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class GitHub:
    """The part of GitHub's REST API the github ticket backend uses, kept in memory: list a
    repository's issues (state, labels, pages), open one, comment on one. Bearer auth with
    ``token``; 401 "Bad credentials" otherwise, as GitHub answers."""

    url: str
    token: str
    repository: str = "acme/platform"
    issues: list[dict[str, Any]] = field(default_factory=list)
    comments: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)


@contextmanager
def github_server(token: str) -> Iterator[GitHub]:
    port = free_port()
    hub = GitHub(f"http://127.0.0.1:{port}", token)
    prefix = f"/repos/{hub.repository}/issues"

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, payload: Any) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _allowed(self) -> bool:
            hub.requests.append((self.command, self.path, dict(self.headers)))
            if self.headers.get("Authorization") != f"Bearer {hub.token}":
                self._answer(401, {"message": "Bad credentials", "status": "401"})
                return False
            return True

        def do_GET(self):
            if not self._allowed():
                return
            url = urllib.parse.urlsplit(self.path)
            if url.path != prefix:
                return self._answer(404, {"message": "Not Found"})
            query = dict(urllib.parse.parse_qsl(url.query))
            wanted = set(filter(None, query.get("labels", "").split(",")))
            state = query.get("state", "open")
            found = [
                i
                for i in hub.issues
                if (state == "all" or i["state"] == state)
                and wanted <= {label["name"] for label in i["labels"]}
            ]
            found.sort(key=lambda i: -i["number"])  # newest first, as GitHub lists them
            per_page, page = int(query.get("per_page", 30)), int(query.get("page", 1))
            self._answer(200, found[(page - 1) * per_page : page * per_page])

        def do_POST(self):
            if not self._allowed():
                return
            payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            path = urllib.parse.urlsplit(self.path).path
            if path == prefix:
                if not payload.get("title"):
                    return self._answer(422, {"message": "Validation Failed"})
                number = len(hub.issues) + 1
                issue = {
                    "number": number,
                    "title": payload["title"],
                    "body": payload.get("body", ""),
                    "state": "open",
                    "labels": [{"name": n} for n in payload.get("labels", [])],
                    "html_url": f"https://github.example/{hub.repository}/issues/{number}",
                }
                hub.issues.append(issue)
                return self._answer(201, issue)
            parts = path.removeprefix(prefix + "/").split("/")
            if len(parts) == 2 and parts[1] == "comments" and parts[0].isdigit():
                number = int(parts[0])
                if not any(i["number"] == number for i in hub.issues):
                    return self._answer(404, {"message": "Not Found"})
                comment = {"id": sum(map(len, hub.comments.values())) + 1, "body": payload["body"]}
                hub.comments.setdefault(number, []).append(comment)
                return self._answer(201, comment)
            self._answer(404, {"message": "Not Found"})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
