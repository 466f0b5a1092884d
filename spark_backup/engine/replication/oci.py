"""The OCI registry target: each version one artifact, pushed with the ``oras`` client
(oras-py), ModelPack-style: artifact type ``application/vnd.cncf.model.manifest.v1+json``, a
model config naming the source and version, and one layer per file whose OCI digest is the
file's sha256 (``org.opencontainers.image.title`` and ``org.cncf.model.filepath`` name it).

Layers are streamed from the source store to a temporary file one at a time, checked against
the version's digest and uploaded in chunks, so memory holds one chunk and the disk one file.
A registry that cannot be reached is said in one line at once (oras's own retries wait
minutes), and the version stays unreplicated for the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from spark_backup.engine.replication.config import OciReplicaConfig
from spark_backup.engine.replication.targets import (
    ReplicaTarget,
    ReplicaUnavailable,
    _check_source,
)
from spark_backup.engine.replication.version import ReplicaVersion
from spark_backup.engine.streams import CHUNK_SIZE
from spark_backup.errors import StoreError

ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.cncf.model.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TITLE = "org.opencontainers.image.title"
FILEPATH = "org.cncf.model.filepath"


class OciReplica(ReplicaTarget):
    kind = "oci"

    def __init__(self, config: OciReplicaConfig, environ: dict[str, str] | None = None):
        self.name = config.name
        self.config = config
        self._environ = dict(os.environ if environ is None else environ)
        self._client: Any = None

    @property
    def _scheme(self) -> str:
        return "http" if self.config.insecure else "https"

    def reference(self, version: ReplicaVersion) -> str:
        return f"{self.config.registry}/{self.config.repository}/{version.source}:{version.version}"

    def location(self, version: ReplicaVersion) -> str:
        return f"oci://{self.reference(version)}"

    def _connect(self) -> Any:
        """The oras client, once the registry answered its API root."""
        try:
            import oras.client
            import requests
        except ImportError:
            raise StoreError(
                f"replica {self.name}: OCI replication needs oras: pip install 'spark-backup[oci]'"
            ) from None
        url = f"{self._scheme}://{self.config.registry}/v2/"
        try:
            answer = requests.get(url, timeout=self.config.timeout_seconds)
        except requests.RequestException as exc:
            reason = type(exc).__name__
            raise ReplicaUnavailable(
                f"replica {self.name}: registry {self.config.registry} unreachable ({reason})"
            ) from None
        if answer.status_code not in (200, 401):
            raise ReplicaUnavailable(
                f"replica {self.name}: registry {self.config.registry} answered "
                f"{answer.status_code} at /v2/"
            )
        if self._client is None:
            client = oras.client.OrasClient(
                hostname=self.config.registry, insecure=self.config.insecure
            )
            if self.config.username_env and self.config.password_env:
                client.auth.set_basic_auth(
                    self._environ.get(self.config.username_env, ""),
                    self._environ.get(self.config.password_env, ""),
                )
            self._client = client
        return self._client

    def _request(self, client: Any, method: str, url: str, **kwargs: Any) -> Any:
        import requests

        try:
            return client.do_request(url, method, **kwargs)
        except (requests.RequestException, ValueError) as exc:
            raise ReplicaUnavailable(
                f"replica {self.name}: {method} {url.split('/v2/', 1)[-1]} failed "
                f"({type(exc).__name__})"
            ) from None

    def push(self, version: ReplicaVersion) -> dict[str, str]:
        client = self._connect()
        container = client.get_container(self.reference(version))
        layers = []
        with tempfile.TemporaryDirectory(prefix="spark-backup-oci-") as scratch:
            for item in version.files:
                layer = {
                    "mediaType": item.media_type,
                    "size": item.size,
                    "digest": item.digest,
                    "annotations": {TITLE: item.name, FILEPATH: item.name},
                }
                layers.append(layer)
                url = f"{self._scheme}://{container.get_blob_url(item.digest)}"
                if self._request(client, "HEAD", url).status_code == 200:
                    continue  # content-addressed: the registry holds these very bytes
                path = Path(scratch) / "layer"
                digest, size = hashlib.sha256(), 0
                with item.open() as source, open(path, "wb") as out:
                    while chunk := source.read(CHUNK_SIZE):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                _check_source(item, digest.hexdigest(), size, version)
                self._upload(client, container, path, layer)
                path.unlink()
            config = json.dumps(
                {
                    "descriptor": {
                        "name": version.source,
                        "version": version.version,
                        "createdAt": version.annotations.get("org.opencontainers.image.created"),
                    },
                    "config": {"partition": version.partition},
                    "modelfs": {
                        "type": "layers",
                        "diffIds": [item.digest for item in version.files],
                    },
                },
                sort_keys=True,
            ).encode()
            config_path = Path(scratch) / "config.json"
            config_path.write_bytes(config)
            config_layer = {
                "mediaType": CONFIG_MEDIA_TYPE,
                "size": len(config),
                "digest": f"sha256:{hashlib.sha256(config).hexdigest()}",
            }
            self._upload(client, container, config_path, config_layer)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "config": config_layer,
            "layers": layers,
            "annotations": {k: v for k, v in version.annotations.items() if v},
        }
        url = f"{self._scheme}://{container.manifest_url()}"
        answer = self._request(
            client, "PUT", url, json=manifest, headers={"Content-Type": OCI_MANIFEST}
        )
        if answer.status_code not in (200, 201):
            raise ReplicaUnavailable(
                f"replica {self.name}: the registry refused the manifest of {version.version} "
                f"({answer.status_code})"
            )
        return self.held(version)

    def _upload(self, client: Any, container: Any, path: Path, layer: dict[str, Any]) -> None:
        import requests

        try:
            answer = client.upload_blob(
                str(path),
                container,
                layer,
                do_chunked=True,
                chunk_size=self.config.chunk_mib << 20,
            )
        except (requests.RequestException, ValueError) as exc:
            raise ReplicaUnavailable(
                f"replica {self.name}: upload of {layer['digest'][:19]}... failed "
                f"({type(exc).__name__})"
            ) from None
        if answer.status_code not in (200, 201, 202):
            raise ReplicaUnavailable(
                f"replica {self.name}: the registry refused {layer['digest'][:19]}... "
                f"({answer.status_code})"
            )

    def held(self, version: ReplicaVersion) -> dict[str, str]:
        """The layers the artifact's manifest lists whose blobs the registry has."""
        client = self._connect()
        container = client.get_container(self.reference(version))
        url = f"{self._scheme}://{container.manifest_url()}"
        answer = self._request(client, "GET", url, headers={"Accept": OCI_MANIFEST})
        if answer.status_code == 404:
            return {}
        if answer.status_code != 200:
            raise ReplicaUnavailable(
                f"replica {self.name}: manifest of {version.version}: {answer.status_code}"
            )
        found = {}
        for layer in answer.json().get("layers", []):
            title = (layer.get("annotations") or {}).get(TITLE)
            blob = f"{self._scheme}://{container.get_blob_url(layer['digest'])}"
            if title and self._request(client, "HEAD", blob).status_code == 200:
                found[title] = layer["digest"]
        return found
