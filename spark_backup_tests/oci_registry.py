"""A real OCI registry for the replication tests: Debian's ``docker-registry`` (the CNCF
distribution registry) serving a filesystem store on 127.0.0.1, on a free port. It can be
stopped and started again on the same port and storage, as an outage would."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from spark_backup_tests.helpers import free_port


class Registry:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.storage = root / "storage"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.config = root / "config.yml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "version": 0.1,
                    "log": {"level": "error", "accesslog": {"disabled": True}},
                    "storage": {
                        "filesystem": {"rootdirectory": str(self.storage)},
                        "delete": {"enabled": False},
                    },
                    "http": {"addr": self.address},
                }
            )
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("docker-registry")
        if binary is None:
            raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
        self.process = subprocess.Popen(
            [binary, "serve", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "registry.log", "ab"),  # noqa: SIM115 - the process owns it
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"docker-registry did not answer on {self.address}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def repository_folder(self, repository: str) -> Path:
        return self.storage / "docker/registry/v2/repositories" / repository
