"""A MongoDB server for tests, one per test process: the wire-protocol server ``nx-27017``
(SIMULATED: no replica set, no oplog; it rejects Decimal128, Timestamp, Regex, MinKey/MaxKey,
rewrites index names, and its collection uuids are all zeros), or, where ``mongod`` is on the
PATH (or SPARK_BACKUP_TEST_MONGOD names it), a real one-node replica set. That is the one
switch: every MongoDB test runs against whichever this starts."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from spark_backup_tests.helpers import free_port

NX_27017 = Path(sys.executable).with_name("nx-27017")


@dataclass(frozen=True)
class MongoServer:
    uri: str
    # A real mongod (replica set with an oplog), not the simulated server.
    real: bool
    process: subprocess.Popen

    def client(self):
        import pymongo

        return pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=10_000)


_server: MongoServer | None = None


def mongo_server() -> MongoServer:
    """The process's server, started on first use and stopped at exit."""
    global _server
    if _server is None:
        mongod = os.environ.get("SPARK_BACKUP_TEST_MONGOD") or shutil.which("mongod")
        folder = Path(tempfile.mkdtemp(prefix="spark-backup-mongo-"))
        _server = _start_mongod(mongod, folder) if mongod else _start_nx(folder)
        atexit.register(_stop, _server, folder)
    return _server


def _start_nx(folder: Path) -> MongoServer:
    port = free_port()
    process = subprocess.Popen(
        [
            str(NX_27017),
            "--data-dir",
            str(folder / "data"),
            "--host",
            "127.0.0.1",
            "-p",
            str(port),
            "--log-file",
            str(folder / "nx.log"),
            "--pid-file",
            str(folder / "nx.pid"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = MongoServer(f"mongodb://127.0.0.1:{port}/?directConnection=true", False, process)
    _wait(server)
    return server


def _start_mongod(mongod: str, folder: Path) -> MongoServer:
    port = free_port()
    (folder / "data").mkdir()
    arguments = ["--replSet", "rs0", "--bind_ip", "127.0.0.1", "--port", str(port)]
    arguments += ["--dbpath", str(folder / "data"), "--logpath", str(folder / "mongod.log")]
    process = subprocess.Popen([mongod, *arguments], stdout=subprocess.DEVNULL)
    direct = MongoServer(f"mongodb://127.0.0.1:{port}/?directConnection=true", True, process)
    _wait(direct)
    with direct.client() as client:
        client.admin.command(
            "replSetInitiate", {"_id": "rs0", "members": [{"_id": 0, "host": f"127.0.0.1:{port}"}]}
        )
    server = MongoServer(f"mongodb://127.0.0.1:{port}/?replicaSet=rs0", True, process)
    _wait(server, primary=True)
    return server


def _wait(server: MongoServer, primary: bool = False) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with server.client() as client:
                hello = client.admin.command("hello")
                if not primary or hello.get("isWritablePrimary"):
                    return
        except Exception:
            if server.process.poll() is not None or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def _stop(server: MongoServer, folder: Path) -> None:
    server.process.terminate()
    try:
        server.process.wait(10)
    except subprocess.TimeoutExpired:
        server.process.kill()
    shutil.rmtree(folder, ignore_errors=True)
