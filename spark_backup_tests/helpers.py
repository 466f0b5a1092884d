"""Builders for plans, estates and keys that tests share."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from spark_backup.engine.cadence import partition_key_for
from spark_backup.engine.crypto import generate_identity
from spark_backup.engine.manifest import Manifest, data_key, manifest_key, new_copy_id
from spark_backup.engine.stores import ObjectStore
from spark_backup.errors import SourceError

SPARK_BACKUP = [sys.executable, "-m", "spark_backup"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_key(directory: Path, name: str = "age") -> tuple[Path, str]:
    """A fresh age identity file and its public key."""
    path = directory / f"{name}.key"
    return path, generate_identity(path)


def make_estate(root: Path) -> Path:
    """A small configuration tree with modes, nested folders, a symlink and an excluded file."""
    files = {
        "etc/nvidia/fabricmanager.cfg": (0o644, "FABRIC_MODE=0\n"),
        "etc/nvidia/runtime/config.toml": (0o640, "[nvidia-container-cli]\n"),
        "etc/wireguard/wg0.conf": (0o600, "[Interface]\nListenPort = 51820\n"),
        "etc/wireguard/.wg0.conf.swp": (0o600, "swap\n"),
        "etc/kube/manifests/ns.yaml": (0o644, "kind: Namespace\n"),
        "etc/scripts/reload.sh": (0o755, "#!/bin/sh\nexit 0\n"),
    }
    for relative, (mode, content) in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        path.chmod(mode)
        os.utime(path, (1_700_000_000, 1_700_000_000))
    (root / "etc/nvidia/current.cfg").symlink_to("fabricmanager.cfg")
    (root / "etc/empty").mkdir()
    return root / "etc"


def plan_dict(
    recipients: list[str],
    sources: list[dict[str, Any]],
    stores: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "encryption": {"recipients": recipients},
        "stores": stores or [{"name": "local", "kind": "local", "path": "store"}],
        "sources": sources,
        **extra,
    }


def config_source(name: str, paths: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "config_archive",
        "cadence": "weekly",
        "owner": "team:platform",
        "paths": paths,
        **extra,
    }


def mongodb_source(uri: str, databases: list[str], **extra: Any) -> dict[str, Any]:
    """A ``mongodb`` source named ``docs``; ``oplog`` off unless asked (the simulated
    server has none)."""
    return {
        "name": "docs",
        "kind": "mongodb",
        "cadence": "daily",
        "owner": "team:dba",
        "uri": uri,
        "databases": databases,
        "oplog": {"enabled": False},
        **extra,
    }


def write_plan(directory: Path, plan: dict[str, Any], name: str = "spark_backup.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run ``spark-backup`` as a user would, in a fresh process."""
    result = subprocess.run(
        [*SPARK_BACKUP, "--no-progress", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"spark-backup {' '.join(args)} failed: {result.stderr}")
    return result


class BytesSource:
    """A ``PlaintextSource`` over bytes, for tests of the pipeline itself; it can be made to
    fail after ``fail_after`` bytes, as a disk or a network would."""

    def __init__(
        self, data: bytes, fail_after: int | None = None, kind: str = "test_bytes", layers=("raw",)
    ):
        self.data = data
        self.fail_after = fail_after
        self.kind = kind
        self.layers = list(layers)

    @contextmanager
    def open(self):
        fail_after = self.fail_after

        class Reader(io.BytesIO):
            def read(self, size=-1):
                if fail_after is not None and self.tell() >= fail_after:
                    raise SourceError("source 'test': read error: device went away")
                return super().read(size)

        yield Reader(self.data)

    def metadata(self) -> dict[str, Any]:
        return {"length": len(self.data)}

    def tool_versions(self) -> dict[str, str]:
        return {}


def flip_last_byte(data: bytes) -> bytes:
    """The same bytes with the last one changed, whatever it was (damage that always shows)."""
    return data[:-1] + bytes([data[-1] ^ 0x01])


def clone_copies(
    store: ObjectStore,
    template: Manifest,
    count: int,
    *,
    start: dt.datetime,
    step: dt.timedelta,
    cadence: str = "daily",
) -> list[Manifest]:
    """``count`` more copies of ``template``'s source, made without running backups: its stored
    bytes under new data keys and its manifest with a new id, times and partition. Each clone
    is a whole copy (it verifies and restores) committed as a backup commits: data, then
    manifest."""
    stored = store.get_bytes(template.data_key)
    suffix = template.data_key.removeprefix(data_key(template.source, template.id, ""))
    made = []
    for number in range(count):
        started = start + number * step
        copy_id = new_copy_id(template.source, started)
        clone = dataclasses.replace(
            template,
            id=copy_id,
            data_key=data_key(template.source, copy_id, suffix),
            partition=partition_key_for(cadence, started),
            started_at=started.isoformat(),
            finished_at=(started + dt.timedelta(seconds=1)).isoformat(),
        )
        store.put_bytes(clone.data_key, stored)
        store.put_bytes(manifest_key(clone.source, copy_id), clone.to_json())
        made.append(clone)
    return made


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> Path:
    """A safetensors file as the format defines it (name -> dtype, shape, raw bytes), written
    without the safetensors library; tensors in the order given."""
    import json
    import struct

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for _dtype, _shape, data in tensors.values():
            out.write(data)
    return path


def make_model_dir(root: Path, seed: int = 1, tensors: int = 12, floats: int = 16384) -> Path:
    """A LoRA adapter directory: adapter_config.json, tokenizer.json, adapter weights in
    safetensors (fp32, ``tensors`` tensors of ``floats`` values) and a small .nemo archive."""
    import io
    import json
    import random
    import tarfile

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(
        json.dumps(
            {
                "base_model_name_or_path": "meta-llama/Llama-3.1-8B",
                "r": 16,
                "peft_type": "LORA",
                "training_run_id": "run-42",
            }
        )
    )
    (root / "tokenizer.json").write_text(
        json.dumps(
            {
                "version": "1.0",
                "truncation": None,
                "padding": None,
                "added_tokens": [],
                "normalizer": None,
                "pre_tokenizer": {"type": "Whitespace"},
                "post_processor": None,
                "decoder": None,
                "model": {
                    "type": "WordLevel",
                    "vocab": {"[UNK]": 0, "hello": 1, "world": 2},
                    "unk_token": "[UNK]",
                },
            }
        )
    )
    weights = {
        f"base_model.layers.{i}.lora_{'AB'[i % 2]}.weight": (
            "F32",
            [floats // 16, 16],
            rng.randbytes(floats * 4),
        )
        for i in range(tensors)
    }
    write_safetensors(root / "adapter_model.safetensors", weights)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        data = b"model_config: {hidden: 64}\n"
        info = tarfile.TarInfo("model_config.yaml")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    (root / "checkpoint.nemo").write_bytes(buffer.getvalue())
    return root


def llm_source(name: str, path: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "llm_artifacts",
        "cadence": "daily",
        "owner": "team:ml",
        "path": path,
        "chunk_key": "env:SPARK_TEST_CHUNK_KEY",
        **extra,
    }
