"""What a configuration archive's drill proves beyond its file counts: Kubernetes manifests
validated offline (kubernetes-validate) and applied into a namespace of the drill's own through
kubectl, and a restored WireGuard configuration brought up as a real tunnel (wireguard-go in two
network namespaces) that answers pings.

There is no Kubernetes cluster on this machine: the kubectl path runs against a stub ``kubectl``
script that records its calls and keeps the namespaces it was asked to make in a file.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from spark_backup.errors import PlanError
from spark_backup.plan import load_plan
from spark_backup.service import BackupService
from spark_backup.sources.config_archive.wireguard import WG_SOCKET_DIR, tunnel_unavailable
from spark_backup_tests.helpers import config_source, plan_dict, write_plan

NAMESPACE = "apiVersion: v1\nkind: Namespace\nmetadata: {name: llm}\n"
DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: vllm, namespace: llm}
spec:
  replicas: 2
  selector: {matchLabels: {app: vllm}}
  template:
    metadata: {labels: {app: vllm}}
    spec:
      containers:
      - {name: vllm, image: "vllm/vllm-openai:v0.6.3"}
---
apiVersion: v1
kind: Service
metadata: {name: vllm, namespace: llm}
spec:
  selector: {app: vllm}
  ports: [{port: 8000}]
"""
# A Deployment without the selector and template the schema requires.
BROKEN = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: broken}\nspec: {replicas: 1}\n"

STUB_KUBECTL = """\
#!{python}
# A stand-in for kubectl: records every call, keeps the namespaces it made in a file; the
# files all-exist and not-ready beside it make every namespace exist or no rollout finish.
import json, os, sys
args = sys.argv[1:]
if args[:1] == ["--context"]:
    args = args[2:]
here = "{here}"
log, state = here + "/kubectl.log", here + "/ns.json"
names = json.load(open(state)) if os.path.exists(state) else []
entry = {{"args": args}}
if args[0] == "apply":
    entry["applied"] = open(args[args.index("-f") + 1]).read()
with open(log, "a") as handle:
    handle.write(json.dumps(entry) + "\\n")
if args[:2] == ["get", "namespace"]:
    if args[2] in names or os.path.exists(here + "/all-exist"):
        print("namespace/" + args[2]); sys.exit(0)
    print('Error from server (NotFound): namespaces "%s" not found' % args[2], file=sys.stderr)
    sys.exit(1)
if args[:2] == ["create", "namespace"]:
    names.append(args[2])
elif args[:2] == ["delete", "namespace"]:
    names.remove(args[2])
elif args[:2] == ["rollout", "status"] and os.path.exists(here + "/not-ready"):
    print("error: timed out waiting for the condition", file=sys.stderr); sys.exit(1)
json.dump(names, open(state, "w"))
"""


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _service(tmp_path: Path, age_key, paths: list[Path], drill: dict) -> BackupService:
    plan = plan_dict([age_key[1]], [config_source("cluster", [str(p) for p in paths], drill=drill)])
    plan["encryption"]["identity_file"] = str(age_key[0])
    return BackupService.from_path(write_plan(tmp_path, plan))


def _drill(service: BackupService, tmp_path: Path):
    service.backup("cluster")
    staging = tmp_path / "staging"
    staging.mkdir(exist_ok=True)
    report = service.drill("cluster", staging_root=staging)
    assert list(staging.iterdir()) == []  # the drill's staging is gone, pass or fail
    (step,) = report.steps
    return report, step


# --- Kubernetes -----------------------------------------------------------------------------------


def test_manifests_validated_offline(tmp_path: Path, age_key) -> None:
    k8s = _tree(
        tmp_path / "k8s",
        {
            "manifests/namespace.yaml": NAMESPACE,
            "manifests/vllm.yaml": DEPLOYMENT,
            "helm/values/vllm.yaml": "image: {tag: v0.6.3}\n",  # not a manifest: not matched
        },
    )
    service = _service(
        tmp_path, age_key, [k8s], {"kubernetes": {"manifests": ["manifests/*.yaml"]}}
    )
    report, step = _drill(service, tmp_path)
    assert report.passed, step.description
    assert step.metrics["manifest_files"] == 2 and step.metrics["objects"] == 3
    assert step.metrics["invalid"] == 0
    assert "3 objects in 2 manifests valid for Kubernetes 1.30.0" in step.description
    assert "offline" in step.description


def test_an_invalid_manifest_fails_the_drill_naming_file_and_object(
    tmp_path: Path, age_key
) -> None:
    k8s = _tree(tmp_path / "k8s", {"manifests/vllm.yaml": DEPLOYMENT, "manifests/b.yaml": BROKEN})
    service = _service(tmp_path, age_key, [k8s], {"kubernetes": {"manifests": ["*.yaml"]}})
    report, step = _drill(service, tmp_path)
    assert not report.passed
    assert step.metrics["invalid"] == 1
    assert "manifests/b.yaml#1 Deployment/broken" in step.description
    assert "'selector' is a required property" in step.description
    assert service.last_drill("cluster").passed is False


def test_no_matching_manifest_fails_the_drill(tmp_path: Path, age_key) -> None:
    k8s = _tree(tmp_path / "k8s", {"manifests/vllm.yaml": DEPLOYMENT})
    service = _service(tmp_path, age_key, [k8s], {"kubernetes": {"manifests": ["*.json"]}})
    report, step = _drill(service, tmp_path)
    assert not report.passed and "no restored file matches *.json" in step.description


@pytest.fixture
def kubectl(tmp_path: Path) -> dict[str, Path]:
    script = tmp_path / "kubectl"
    script.write_text(STUB_KUBECTL.format(python=sys.executable, here=tmp_path))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    paths = {"script": script, "log": tmp_path / "kubectl.log", "state": tmp_path / "ns.json"}
    return paths


def _calls(kubectl: dict[str, Path]) -> list[dict]:
    return [json.loads(line) for line in kubectl["log"].read_text().splitlines()]


def _cluster_service(tmp_path, age_key, kubectl, **cluster) -> BackupService:
    k8s = _tree(
        tmp_path / "k8s", {"manifests/ns.yaml": NAMESPACE, "manifests/vllm.yaml": DEPLOYMENT}
    )
    drill = {
        "kubernetes": {
            "manifests": ["manifests/*.yaml"],
            "cluster": {"kubectl": str(kubectl["script"]), "context": "staging", **cluster},
        }
    }
    return _service(tmp_path, age_key, [k8s], drill)


def test_manifests_applied_into_a_fresh_namespace_and_deleted(tmp_path, age_key, kubectl) -> None:
    service = _cluster_service(tmp_path, age_key, kubectl)
    report, step = _drill(service, tmp_path)
    assert report.passed, step.description
    namespace = step.metrics["namespace"]
    assert re.fullmatch(r"drill-\d{8}-\d{6}-[0-9a-f]{4}", namespace)
    calls = _calls(kubectl)
    assert [c["args"][:2] for c in calls] == [
        ["get", "namespace"],
        ["create", "namespace"],
        ["apply", "--namespace"],
        ["rollout", "status"],
        ["delete", "namespace"],
    ]
    assert all(namespace in c["args"] for c in calls)
    assert "deployment/vllm" in calls[3]["args"]
    applied = calls[2]["applied"]
    # Namespaced objects only, moved into the drill's namespace: the Namespace object and the
    # original namespace never reach the cluster.
    assert "kind: Deployment" in applied and "kind: Service" in applied
    assert "kind: Namespace" not in applied and "namespace: llm" not in applied
    assert json.loads(kubectl["state"].read_text()) == []  # the namespace is gone
    assert step.metrics["applied"] == 2 and step.metrics["cluster_scoped_skipped"] == 1
    assert "(1 cluster-scoped left out)" in step.description


def test_an_existing_namespace_is_refused_and_left_alone(tmp_path, age_key, kubectl) -> None:
    (tmp_path / "all-exist").touch()
    service = _cluster_service(tmp_path, age_key, kubectl)
    report, step = _drill(service, tmp_path)
    assert not report.passed
    assert "already exists: not the drill's own, left untouched" in step.description
    assert [c["args"][0] for c in _calls(kubectl)] == ["get"]  # nothing made, nothing deleted


def test_workloads_not_ready_fail_the_drill_and_the_namespace_is_deleted(
    tmp_path, age_key, kubectl
) -> None:
    (tmp_path / "not-ready").touch()
    service = _cluster_service(tmp_path, age_key, kubectl, ready_timeout="5s")
    report, step = _drill(service, tmp_path)
    assert not report.passed
    assert "kubectl rollout status: error: timed out waiting for the condition" in step.description
    assert _calls(kubectl)[-1]["args"][:2] == ["delete", "namespace"]
    assert json.loads(kubectl["state"].read_text()) == []


def test_a_bad_drill_setting_is_a_one_line_plan_error(tmp_path: Path, age_key) -> None:
    plan = plan_dict(
        [age_key[1]],
        [config_source("cluster", ["/etc"], drill={"kubernetes": {"manifests": []}})],
    )
    with pytest.raises(PlanError) as caught:
        load_plan(write_plan(tmp_path, plan))
    assert "drill.kubernetes.manifests" in str(caught.value)
    assert "\n" not in str(caught.value)


# --- WireGuard ------------------------------------------------------------------------------------


def _namespaces_work() -> str | None:
    reason = tunnel_unavailable()
    if reason:
        return reason
    name = f"sbtest-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"network namespaces cannot be made here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], check=True)
    return None


def _drill_namespaces() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith("sbdrill-")]


@pytest.fixture(scope="module")
def netns() -> None:
    reason = _namespaces_work()
    if reason:
        pytest.skip(reason)


def _key() -> str:
    """A WireGuard key: 32 random bytes in base64 (wg clamps a private key itself)."""
    return base64.b64encode(os.urandom(32)).decode()


def _gateway(private: str) -> str:
    return (
        "# the office gateway\n[Interface]\nAddress = 10.8.0.1/24\nListenPort = 51820\n"
        f"PrivateKey = {private}\nDNS = 10.8.0.53\nPostUp = iptables -A FORWARD -i %i -j ACCEPT\n\n"
        f"[Peer]\nPublicKey = {_key()}\nAllowedIPs = 10.8.0.2/32\n"
        "Endpoint = laptop.example.com:51820\n"
    )


def test_restored_wireguard_config_carries_traffic(tmp_path: Path, age_key, netns) -> None:
    private = _key()
    vpn = _tree(
        tmp_path / "vpn",
        {"wireguard/wg0.conf": _gateway(private), "openvpn/server.conf": "port 1194\n"},
    )
    service = _service(tmp_path, age_key, [vpn], {"wireguard": {"configs": ["wireguard/*.conf"]}})
    report, step = _drill(service, tmp_path)
    assert report.passed, step.description
    assert step.metrics["wireguard_configs"] == 1 and step.metrics["wireguard_peers"] == 1
    assert step.metrics["ping_received"] == 3 and step.metrics["handshake"] is True
    assert "tunnel up, 3 pings answered by 10.8.0.1" in step.description
    assert _drill_namespaces() == []
    assert not any(WG_SOCKET_DIR.glob("sb*.sock")) if WG_SOCKET_DIR.exists() else True
    # The restored private key appears nowhere the drill wrote.
    record = json.dumps(report.to_dict()) + json.dumps(service.last_drill("cluster").__dict__)
    assert private not in record and private[:20] not in record


def test_a_tunnel_that_does_not_come_up_fails_and_is_cleaned_up(
    tmp_path: Path, age_key, netns
) -> None:
    # A zeroed private key parses, but wg treats it as no key: no handshake, no reply.
    vpn = _tree(tmp_path / "vpn", {"wireguard/wg0.conf": _gateway("A" * 43 + "=")})
    service = _service(
        tmp_path, age_key, [vpn], {"wireguard": {"configs": ["*.conf"], "timeout": "3s"}}
    )
    report, step = _drill(service, tmp_path)
    assert not report.passed
    assert "no reply from 10.8.0.1 through the tunnel within 3s" in step.description
    assert step.metrics["namespaces"] == 2
    assert _drill_namespaces() == []


def test_a_malformed_wireguard_config_fails_naming_line_not_key(tmp_path: Path, age_key) -> None:
    secret = _key()
    text = f"[Interface]\nAddress = 10.8.0.1/24\nPrivateKey = {secret[:-4]}\n"
    vpn = _tree(tmp_path / "vpn", {"wireguard/wg0.conf": text})
    service = _service(tmp_path, age_key, [vpn], {"wireguard": {"configs": ["*.conf"]}})
    report, step = _drill(service, tmp_path)
    assert not report.passed
    assert "wireguard/wg0.conf:3 PrivateKey: not a WireGuard key" in step.description
    assert secret[:-4] not in step.description


def test_parse_only_when_the_tunnel_probe_is_off(tmp_path: Path, age_key) -> None:
    vpn = _tree(tmp_path / "vpn", {"wireguard/wg0.conf": _gateway(_key())})
    service = _service(
        tmp_path, age_key, [vpn], {"wireguard": {"configs": ["*.conf"], "tunnel": False}}
    )
    report, step = _drill(service, tmp_path)
    assert report.passed, step.description
    assert "1 WireGuard configurations parsed (tunnel probe off in the plan)" in step.description


def test_the_runbooks_tunnel_drill_by_hand(tmp_path: Path, age_key, netns) -> None:
    """The runbook's by-hand block brings a restored configuration up with standard tools."""
    from spark_backup_tests.test_runbooks import DOCS, fenced_blocks

    vpn = _tree(tmp_path / "vpn", {"wireguard/wg0.conf": _gateway(_key())})
    service = _service(tmp_path, age_key, [vpn], {"wireguard": {"configs": ["*.conf"]}})
    (manifest,) = service.backup("cluster")
    restored = tmp_path / "restored"
    service.restore(manifest.id, restored)
    (conf,) = restored.rglob("wg0.conf")
    (script,) = [
        b
        for b in fenced_blocks(DOCS / "runbooks" / "config_archive.md", "bash")
        if b.startswith("# A tunnel drill by hand")
    ]
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={**os.environ, "CONF": str(conf), "STAGING": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "3 received" in result.stdout and "tunnel drill of" in result.stdout
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "drillgw" not in listed and "drillpr" not in listed
    assert not (tmp_path / "probe.key").exists()


# --- OpenVPN --------------------------------------------------------------------------------------

SERVER = """\
# the office gateway
port 1194
proto udp
dev tun
ca keys/ca.crt
cert keys/server.crt
key keys/server.key  # kept secret
dh none
client-config-dir ccd
server 10.9.0.0 255.255.255.0
<tls-crypt>
-----BEGIN OpenVPN Static key V1-----
00112233445566778899aabbccddeeff
-----END OpenVPN Static key V1-----
</tls-crypt>
"""


def _openvpn(tmp_path: Path, server: str, **files: str) -> Path:
    tree = {"openvpn/server.conf": server, "openvpn/ccd/client1": "ifconfig-push 10.9.0.10\n"}
    tree.update({f"openvpn/keys/{name}": text for name, text in files.items()})
    return _tree(tmp_path / "vpn", tree)


def test_openvpn_config_parsed_and_the_files_it_names_restored(tmp_path: Path, age_key) -> None:
    vpn = _openvpn(
        tmp_path, SERVER, **{"ca.crt": "ca\n", "server.crt": "crt\n", "server.key": "k\n"}
    )
    service = _service(tmp_path, age_key, [vpn], {"openvpn": {"configs": ["openvpn/*.conf"]}})
    report, step = _drill(service, tmp_path)
    assert report.passed, step.description
    assert "1 OpenVPN configurations parsed, the 4 files they name restored" in step.description
    assert step.metrics["openvpn_files_referenced"] == 4


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        (SERVER, "openvpn/server.conf:7: key keys/server.key: the copy does not hold it"),
        (
            SERVER.replace("</tls-crypt>\n", ""),
            "openvpn/server.conf:11: <tls-crypt> is never closed",
        ),
        (
            SERVER.replace("proto udp", "proto quic"),
            "openvpn/server.conf:3: proto: unknown protocol",
        ),
        (SERVER.replace("port 1194", "port 99999"), "openvpn/server.conf:2: port: expected a port"),
    ],
)
def test_a_broken_openvpn_config_fails_the_drill(tmp_path: Path, age_key, server, expected) -> None:
    vpn = _openvpn(tmp_path, server, **{"ca.crt": "ca\n", "server.crt": "crt\n"})
    service = _service(tmp_path, age_key, [vpn], {"openvpn": {"configs": ["*.conf"]}})
    report, step = _drill(service, tmp_path)
    assert not report.passed and expected in step.description
    assert "00112233445566778899aabbccddeeff" not in step.description


def test_a_failed_tunnel_drill_in_dagster_opens_one_ticket(tmp_path: Path, age_key, netns) -> None:
    """Through Dagster: the drill asset's restore_drill check fails on a tunnel that carries
    nothing, check_failures opens exactly one ticket, and no namespace is left behind."""
    from dagster import DagsterInstance, build_sensor_context

    from spark_backup.defs.build import build_definitions
    from spark_backup.defs.drills import DRILL_CHECK, drill_asset_key
    from spark_backup.defs.sensors import CHECK_FAILURE_SENSOR
    from spark_backup.notify.desk import OUTBOX

    vpn = _tree(tmp_path / "vpn", {"wireguard/wg0.conf": _gateway("A" * 43 + "=")})
    plan = plan_dict(
        [age_key[1]],
        [
            config_source(
                "vpn_gw",
                [str(vpn)],
                cadence="daily",
                drill={"wireguard": {"configs": ["*.conf"], "timeout": "3s"}},
            )
        ],
        notifications={"state_dir": "notifications"},
    )
    plan["encryption"]["identity_file"] = str(age_key[0])
    path = write_plan(tmp_path, plan)
    (copy,) = BackupService.from_path(path).backup("vpn_gw")
    defs = build_definitions(load_plan(path))
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("daily_drills").execute_in_process(
            instance=instance,
            partition_key=copy.partition,
            asset_selection=[drill_asset_key("vpn_gw")],
            raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
        )
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert not checks[DRILL_CHECK].passed
        assert "no reply from 10.8.0.1 through the tunnel" in checks[DRILL_CHECK].description
        assert _drill_namespaces() == []
        with build_sensor_context(
            instance=instance,
            definitions=defs,
            resources=defs.get_repository_def().get_top_level_resources(),
        ) as context:
            cursor = defs.resolve_sensor_def(CHECK_FAILURE_SENSOR).evaluate_tick(context).cursor
        opened = [json.loads(line) for line in (tmp_path / "notifications" / OUTBOX).open()]
        assert [(e["action"], DRILL_CHECK in e["title"]) for e in opened] == [("open", True)]
        with build_sensor_context(
            instance=instance,
            cursor=cursor,
            definitions=defs,
            resources=defs.get_repository_def().get_top_level_resources(),
        ) as context:
            defs.resolve_sensor_def(CHECK_FAILURE_SENSOR).evaluate_tick(context)
        assert len((tmp_path / "notifications" / OUTBOX).read_text().splitlines()) == 1
