"""The OpenVPN part of a configuration archive's drill: each restored configuration parsed, and
every file it names (keys, certificates, the CRL, the client-config folder) present in the
restored tree. No tunnel is brought up (there is no OpenVPN on the test machine); the WireGuard
part does that for WireGuard.

A relative path is looked up beside the configuration (OpenVPN reads it from its working
folder, which its service units set to the configuration's); an absolute one at its place in the
restored tree. Inline blocks (``<ca> ... </ca>``) must be closed; their contents, which may be
keys, never appear in a message.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spark_backup.sources.config_archive.settings import OpenVpnDrill

# Directives whose first argument is a file the configuration needs.
FILE_DIRECTIVES = frozenset(
    {
        "ca",
        "cert",
        "key",
        "dh",
        "tls-auth",
        "tls-crypt",
        "tls-crypt-v2",
        "crl-verify",
        "secret",
        "pkcs12",
        "auth-user-pass",
        "extra-certs",
    }
)
FOLDER_DIRECTIVES = frozenset({"client-config-dir"})
PROTOCOLS = frozenset(
    {"udp", "udp4", "udp6", "tcp", "tcp4", "tcp6", "tcp-server", "tcp-client", "tcp4-server",
     "tcp6-server", "tcp4-client", "tcp6-client"}
)  # fmt: skip


class OpenVpnError(Exception):
    pass


@dataclass
class OpenVpnResult:
    passed: bool
    description: str
    metrics: dict[str, Any] = field(default_factory=dict)


def parse(text: str, archived: str) -> list[tuple[int, str, list[str]]]:
    """(line, directive, arguments) of each directive outside inline blocks."""
    directives: list[tuple[int, str, list[str]]] = []
    block: tuple[int, str] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if block is not None:
            if line == f"</{block[1]}>":
                block = None
            continue
        if not line or line[0] in "#;":
            continue
        opening = re.fullmatch(r"<([a-z0-9-]+)>", line)
        if opening:
            block = (number, opening[1])
            continue
        if line.startswith("</"):
            raise OpenVpnError(f"{archived}:{number}: {line} closes no open block")
        words = line.split()
        directives.append((number, words[0].lstrip("-"), words[1:]))
    if block is not None:
        raise OpenVpnError(f"{archived}:{block[0]}: <{block[1]}> is never closed")
    for number, name, arguments in directives:
        where = f"{archived}:{number}: {name}"
        if name in ("port", "lport", "rport") and not (
            arguments and arguments[0].isdigit() and 1 <= int(arguments[0]) <= 65535
        ):
            raise OpenVpnError(f"{where}: expected a port number")
        if name == "proto" and (not arguments or arguments[0] not in PROTOCOLS):
            raise OpenVpnError(f"{where}: unknown protocol {' '.join(arguments[:1])!r}")
    return directives


def _restored(tree: Path, archived: str, value: str) -> Path:
    folder = posixpath.dirname(archived)
    absolute = value if value.startswith("/") else posixpath.join(folder, value)
    return tree / posixpath.normpath(absolute).lstrip("/")


def openvpn_drill(tree: Path, settings: OpenVpnDrill) -> OpenVpnResult:
    from spark_backup.sources.config_archive.kubernetes import restored_files

    files = restored_files(tree, settings.configs)
    metrics: dict[str, Any] = {"openvpn_configs": len(files)}
    if not files:
        return OpenVpnResult(
            False, f"no restored file matches {', '.join(settings.configs)}", metrics
        )
    referenced = 0
    for archived, path in files:
        try:
            directives = parse(path.read_text(encoding="utf-8"), archived)
        except (OpenVpnError, UnicodeDecodeError) as exc:
            return OpenVpnResult(False, str(exc), metrics)
        for number, name, arguments in directives:
            wanted_folder = name in FOLDER_DIRECTIVES
            if not (name in FILE_DIRECTIVES or wanted_folder) or not arguments:
                continue
            value = arguments[0]
            if value in ("[inline]", "none") or (name == "auth-user-pass" and not arguments):
                continue
            restored = _restored(tree, archived, value)
            present = restored.is_dir() if wanted_folder else restored.is_file()
            if not present:
                return OpenVpnResult(
                    False,
                    f"{archived}:{number}: {name} {value}: the copy does not hold it",
                    metrics,
                )
            referenced += 1
    metrics["openvpn_files_referenced"] = referenced
    return OpenVpnResult(
        True,
        f"{len(files)} OpenVPN configurations parsed, the {referenced} files they name restored",
        metrics,
    )
