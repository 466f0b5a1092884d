"""The WireGuard part of a configuration archive's drill: each restored configuration
(wg-quick's format) parsed, and brought up for real to prove it carries traffic.

The tunnel probe needs root and Debian's ``wireguard-go``, ``wireguard-tools`` (``wg``),
``iproute2`` and ``iputils-ping`` (userspace WireGuard: no kernel module needed). For each
configuration it makes two network namespaces joined by a veth pair, names unique to the drill
(wireguard-go's control sockets live in one folder for all namespaces):

- the gateway namespace runs wireguard-go with the restored interface: its private key, listen
  port and peers (their endpoints left out: the drill's namespaces reach no network), addressed
  with the configuration's first IPv4 address;
- the probe namespace runs a second wireguard-go with a key made for the drill, which the
  gateway also accepts as a peer;

then pings the gateway's address through the tunnel and reads the handshake from ``wg``. Both
namespaces (and with them the veth pair and the interfaces) are removed whatever happens. The
restored private key goes to ``wg`` through a file of mode 600 inside the drill's staging and is
never printed, logged or put in a result.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spark_backup.sources.config_archive.settings import WireGuardDrill

WG_SOCKET_DIR = Path("/var/run/wireguard")
TOOLS = ("ip", "wireguard-go", "wg", "ping")
# The veth pair's addresses (RFC 2544 benchmarking range), kept apart from the tunnel's.
UNDERLAYS = (ipaddress.ip_network("198.18.0.0/30"), ipaddress.ip_network("198.19.255.0/30"))
PROBE_ADDRESSES = (ipaddress.ip_address("198.18.1.2"), ipaddress.ip_address("198.19.1.2"))
DEFAULT_PORT = 51820
_KEYS = ("PrivateKey", "PublicKey", "PresharedKey")
# wg-quick's own keys, which ``wg setconf`` does not take.
_QUICK_ONLY = (
    "Address",
    "DNS",
    "MTU",
    "Table",
    "PreUp",
    "PostUp",
    "PreDown",
    "PostDown",
    "SaveConfig",
)


class WireGuardError(Exception):
    """A configuration that does not parse or a tunnel that did not come up (one line)."""


@dataclass
class Peer:
    public_key: str
    allowed_ips: list[str] = field(default_factory=list)
    preshared_key: str | None = None
    keepalive: int | None = None


@dataclass
class WireGuardConfig:
    path: str
    private_key: str = field(repr=False)
    addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]
    listen_port: int | None
    mtu: int | None
    peers: list[Peer]

    def setconf(self, listen_port: int) -> str:
        """The configuration as ``wg setconf`` takes it: no wg-quick keys, no endpoints."""
        lines = ["[Interface]", f"PrivateKey = {self.private_key}", f"ListenPort = {listen_port}"]
        for peer in self.peers:
            lines += ["", "[Peer]", f"PublicKey = {peer.public_key}"]
            if peer.preshared_key:
                lines.append(f"PresharedKey = {peer.preshared_key}")
            if peer.allowed_ips:
                lines.append(f"AllowedIPs = {', '.join(peer.allowed_ips)}")
        return "\n".join(lines) + "\n"


def _key(value: str, where: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        # Never the value: it may be a private key.
        raise WireGuardError(f"{where}: not a WireGuard key (32 bytes in base64)")
    return value


def parse_config(text: str, path: str) -> WireGuardConfig:
    """Parse wg-quick's format; ``WireGuardError`` names the file, line and key."""
    section: str | None = None
    interface: dict[str, str] = {}
    peers: list[dict[str, str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        where = f"{path}:{number}"
        if not line:
            continue
        header = re.fullmatch(r"\[(\w+)\]", line)
        if header:
            section = header[1].lower()
            if section == "peer":
                peers.append({})
            elif section != "interface":
                raise WireGuardError(f"{where}: unknown section [{header[1]}]")
            continue
        if "=" not in line or section is None:
            raise WireGuardError(f"{where}: expected 'Key = value' inside a section")
        key, value = (part.strip() for part in line.split("=", 1))
        target = interface if section == "interface" else peers[-1]
        if key in _KEYS:
            _key(value, f"{where} {key}")
        target[key] = value if key not in target else f"{target[key]}, {value}"
    if "PrivateKey" not in interface:
        raise WireGuardError(f"{path}: [Interface] has no PrivateKey")
    addresses = []
    for item in _split(interface.get("Address", "")):
        try:
            addresses.append(ipaddress.ip_interface(item))
        except ValueError:
            raise WireGuardError(f"{path}: Address {item!r} is not an address/prefix") from None
    listen_port = _int(interface.get("ListenPort"), f"{path}: ListenPort", 1, 65535)
    mtu = _int(interface.get("MTU"), f"{path}: MTU", 576, 65535)
    parsed: list[Peer] = []
    for index, peer in enumerate(peers, 1):
        if "PublicKey" not in peer:
            raise WireGuardError(f"{path}: [Peer] {index} has no PublicKey")
        allowed = _split(peer.get("AllowedIPs", ""))
        for item in allowed:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise WireGuardError(
                    f"{path}: [Peer] {index} AllowedIPs {item!r} is not a network"
                ) from None
        parsed.append(
            Peer(
                peer["PublicKey"],
                allowed,
                peer.get("PresharedKey"),
                _int(peer.get("PersistentKeepalive"), f"{path}: PersistentKeepalive", 0, 65535),
            )
        )
    return WireGuardConfig(path, interface["PrivateKey"], addresses, listen_port, mtu, parsed)


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _int(value: str | None, where: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or not low <= int(value) <= high:
        raise WireGuardError(f"{where}: expected a number from {low} to {high}, got {value!r}")
    return int(value)


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def tunnel_unavailable() -> str | None:
    """Why this machine cannot run the tunnel probe, or None."""
    if os.geteuid() != 0:
        return "the tunnel probe needs root (network namespaces)"
    missing = missing_tools()
    if missing:
        return f"the tunnel probe needs {', '.join(missing)} (Debian: wireguard-go wireguard-tools iproute2 iputils-ping)"
    return None


@dataclass
class TunnelResult:
    passed: bool
    description: str
    metrics: dict[str, Any] = field(default_factory=dict)
    namespaces_removed: bool = True


class _Tunnel:
    """Two namespaces, a veth pair, two wireguard-go processes; ``close`` removes them all."""

    def __init__(self, scratch: Path, timeout: float):
        tag = secrets.token_hex(3)
        self.scratch = scratch
        self.timeout = timeout
        self.gateway_ns = f"sbdrill-gw-{tag}"
        self.probe_ns = f"sbdrill-pr-{tag}"
        self.gateway_if = f"sbgw{tag}"
        self.probe_if = f"sbpr{tag}"
        self.veth = (f"sbva{tag}", f"sbvb{tag}")
        self.made: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    def run(
        self,
        *args: str,
        namespace: str | None = None,
        input: str | None = None,
        limit: float | None = None,
    ) -> str:
        argv = ["ip", "netns", "exec", namespace, *args] if namespace else list(args)
        try:
            result = subprocess.run(
                argv, input=input, capture_output=True, text=True, timeout=limit or self.timeout
            )
        except subprocess.TimeoutExpired:
            raise WireGuardError(
                f"{args[0]} {args[1]} did not finish in {self.timeout:.0f}s"
            ) from None
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            reason = lines[-1].strip() if lines else f"exit status {result.returncode}"
            raise WireGuardError(f"{' '.join(args[:3])}: {reason}")
        return result.stdout

    def namespaces(self) -> None:
        for namespace in (self.gateway_ns, self.probe_ns):
            self.run("ip", "netns", "add", namespace)
            self.made.append(namespace)
            self.run("ip", "-n", namespace, "link", "set", "lo", "up")
        a, b = self.veth
        self.run(
            "ip", "link", "add", a, "netns", self.gateway_ns, "type", "veth",
            "peer", "name", b, "netns", self.probe_ns,
        )  # fmt: skip

    def wireguard(self, namespace: str, interface: str) -> None:
        """Start wireguard-go in the foreground (so that its pid is ours to stop) and wait for
        its control socket."""
        socket = WG_SOCKET_DIR / f"{interface}.sock"
        if socket.exists():
            raise WireGuardError(f"{socket} exists: interface name {interface} is taken")
        log = open(self.scratch / f"{interface}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            ["ip", "netns", "exec", namespace, "wireguard-go", "-f", interface],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={
                "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                "LOG_LEVEL": "error",
            },
        )
        log.close()
        self.processes.append(process)
        deadline = time.monotonic() + self.timeout
        while not socket.exists():
            if process.poll() is not None:
                tail = (self.scratch / f"{interface}.log").read_text(errors="replace").strip()
                last = tail.splitlines()[-1] if tail else f"exit status {process.returncode}"
                raise WireGuardError(f"wireguard-go {interface} stopped: {last}")
            if time.monotonic() > deadline:
                raise WireGuardError(
                    f"wireguard-go {interface}: no control socket after {self.timeout:.0f}s"
                )
            time.sleep(0.05)

    def close(self) -> str | None:
        """Stop the processes, delete the namespaces; what could not be cleaned up, or None."""
        problems: list[str] = []
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
        for namespace in reversed(self.made):
            result = subprocess.run(
                ["ip", "netns", "del", namespace], capture_output=True, text=True, timeout=30
            )
            if result.returncode != 0:
                problems.append(f"namespace {namespace} not removed: {result.stderr.strip()}")
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        left = [n for n in self.made if re.search(rf"^{re.escape(n)}\b", listed, re.M)]
        problems += [
            f"namespace {n} still listed" for n in left if not any(n in p for p in problems)
        ]
        return "; ".join(problems) or None


def _underlay(config: WireGuardConfig) -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Address]:
    used = [a.network for a in config.addresses] + [
        ipaddress.ip_network(n, strict=False) for p in config.peers for n in p.allowed_ips
    ]
    for underlay, probe in zip(UNDERLAYS, PROBE_ADDRESSES, strict=True):
        if not any(
            n.version == 4 and n.prefixlen > 0 and (n.overlaps(underlay) or probe in n)
            for n in used
        ):
            return underlay, probe
    raise WireGuardError(f"{config.path}: its addresses cover both of the drill's test networks")


def probe_tunnel(config: WireGuardConfig, scratch: Path, timeout: float) -> TunnelResult:
    gateway = next((a.ip for a in config.addresses if a.version == 4), None)
    if gateway is None:
        return TunnelResult(False, f"{config.path}: no IPv4 Address to ping through the tunnel")
    try:
        underlay, probe_ip = _underlay(config)
    except WireGuardError as exc:
        return TunnelResult(False, str(exc))
    port = config.listen_port or DEFAULT_PORT
    gw_under, probe_under = (f"{h}/{underlay.prefixlen}" for h in list(underlay.hosts())[:2])
    tunnel = _Tunnel(scratch, timeout)
    clock = time.monotonic()
    metrics: dict[str, Any] = {}
    problem: str | None = None
    keys: list[Path] = []
    try:
        tunnel.namespaces()
        a, b = tunnel.veth
        tunnel.run("ip", "-n", tunnel.gateway_ns, "addr", "add", gw_under, "dev", a)
        tunnel.run("ip", "-n", tunnel.probe_ns, "addr", "add", probe_under, "dev", b)
        tunnel.run("ip", "-n", tunnel.gateway_ns, "link", "set", a, "up")
        tunnel.run("ip", "-n", tunnel.probe_ns, "link", "set", b, "up")
        tunnel.wireguard(tunnel.gateway_ns, tunnel.gateway_if)
        tunnel.wireguard(tunnel.probe_ns, tunnel.probe_if)
        old_umask = os.umask(0o077)
        try:
            gateway_conf = scratch / "gateway.conf"
            gateway_conf.write_text(config.setconf(port))
            probe_key = scratch / "probe.key"
            probe_key.write_text(tunnel.run("wg", "genkey"))
            keys += [gateway_conf, probe_key]
        finally:
            os.umask(old_umask)
        probe_public = tunnel.run("wg", "pubkey", input=probe_key.read_text()).strip()
        gateway_public = tunnel.run("wg", "pubkey", input=config.private_key + "\n").strip()
        ns_gw, ns_pr = tunnel.gateway_ns, tunnel.probe_ns
        tunnel.run("wg", "setconf", tunnel.gateway_if, str(gateway_conf), namespace=ns_gw)
        tunnel.run(
            "wg", "set", tunnel.gateway_if, "peer", probe_public, "allowed-ips", f"{probe_ip}/32",
            namespace=ns_gw,
        )  # fmt: skip
        tunnel.run(
            "wg", "set", tunnel.probe_if, "private-key", str(probe_key), "peer", gateway_public,
            "allowed-ips", f"{gateway}/32", "endpoint", f"{gw_under.split('/')[0]}:{port}",
            namespace=ns_pr,
        )  # fmt: skip
        for namespace, interface, own, other in (
            (ns_gw, tunnel.gateway_if, gateway, probe_ip),
            (ns_pr, tunnel.probe_if, probe_ip, gateway),
        ):
            tunnel.run("ip", "-n", namespace, "addr", "add", f"{own}/32", "dev", interface)
            if config.mtu:
                tunnel.run("ip", "-n", namespace, "link", "set", interface, "mtu", str(config.mtu))
            tunnel.run("ip", "-n", namespace, "link", "set", interface, "up")
            tunnel.run("ip", "-n", namespace, "route", "add", f"{other}/32", "dev", interface)
        deadline = max(2, int(timeout))
        try:
            output = tunnel.run(
                "ping", "-c", "3", "-i", "0.2", "-w", str(deadline), "-q", str(gateway),
                namespace=ns_pr, limit=deadline + 10,
            )  # fmt: skip
        except WireGuardError:
            raise WireGuardError(
                f"no reply from {gateway} through the tunnel within {deadline}s"
            ) from None
        received = re.search(r"(\d+) received", output)
        rtt = re.search(r"= [\d.]+/([\d.]+)/", output)
        metrics["ping_received"] = int(received[1]) if received else 0
        if rtt:
            metrics["ping_rtt_ms"] = float(rtt[1])
        handshakes = tunnel.run(
            "wg", "show", tunnel.gateway_if, "latest-handshakes", namespace=ns_gw
        )
        stamp = next(
            (
                int(line.split()[1])
                for line in handshakes.splitlines()
                if line.startswith(probe_public)
            ),
            0,
        )
        if not stamp:
            raise WireGuardError(f"{tunnel.gateway_if}: no handshake with the probe peer")
        metrics["handshake"] = True
    except WireGuardError as exc:
        problem = str(exc)
    finally:
        for key in keys:
            key.unlink(missing_ok=True)
        for log in scratch.glob("sb*.log"):
            log.unlink(missing_ok=True)
        cleanup = tunnel.close()
    metrics["tunnel_seconds"] = round(time.monotonic() - clock, 3)
    metrics["namespaces"] = len(tunnel.made)
    if cleanup:
        problem = (problem + "; " if problem else "") + cleanup
    if problem:
        return TunnelResult(False, f"{config.path}: {problem}", metrics, cleanup is None)
    return TunnelResult(
        True,
        f"{config.path}: tunnel up, {metrics['ping_received']} pings answered by {gateway}, "
        "handshake done, namespaces removed",
        metrics,
    )


def wireguard_drill(tree: Path, settings: WireGuardDrill, scratch: Path) -> TunnelResult:
    """Parse every matching configuration; with ``tunnel``, bring each up."""
    from spark_backup.sources.config_archive.kubernetes import restored_files

    files = restored_files(tree, settings.configs)
    metrics: dict[str, Any] = {"wireguard_configs": len(files)}
    if not files:
        return TunnelResult(
            False, f"no restored file matches {', '.join(settings.configs)}", metrics
        )
    configs: list[WireGuardConfig] = []
    for archived, path in files:
        try:
            configs.append(parse_config(path.read_text(encoding="utf-8"), archived))
        except (WireGuardError, UnicodeDecodeError) as exc:
            return TunnelResult(False, f"{exc}", metrics)
    metrics["wireguard_peers"] = sum(len(c.peers) for c in configs)
    parsed = f"{len(configs)} WireGuard configurations parsed"
    if not settings.tunnel:
        return TunnelResult(True, parsed + " (tunnel probe off in the plan)", metrics)
    reason = tunnel_unavailable()
    if reason:
        return TunnelResult(False, f"{parsed}; {reason}", metrics)
    described: list[str] = []
    removed = True
    for config in configs:
        result = probe_tunnel(config, scratch, settings.timeout.total_seconds())
        for name, value in result.metrics.items():
            metrics[name] = metrics.get(name, 0) + value if name == "tunnel_seconds" else value
        removed = removed and result.namespaces_removed
        if not result.passed:
            return TunnelResult(False, f"{parsed}; {result.description}", metrics, removed)
        described.append(result.description)
    return TunnelResult(True, f"{parsed}; " + "; ".join(described), metrics, removed)
