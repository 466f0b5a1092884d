"""The Kubernetes part of a configuration archive's drill: the restored manifests validated
offline against the Kubernetes schemas (``kubernetes-validate``, which ships them), and, where
the plan names a cluster, applied into a fresh namespace made for the drill, waited on until its
workloads are ready, and deleted.

The namespace is the drill's own: ``<prefix>-<UTC time>-<4 hex>``, refused if it already exists (a
drill never reuses or deletes a namespace it did not create). Only namespaced objects are
applied, with their ``metadata.namespace`` removed so that they land in the drill's namespace;
cluster-scoped objects (namespaces, cluster roles, CRDs, ...) are validated but never applied,
since they would change the cluster outside the drill's namespace.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spark_backup.engine.processes import first_error, tool_environment
from spark_backup.globs import patterns_regex
from spark_backup.sources.config_archive.settings import KubernetesCluster, KubernetesDrill

# Kinds that are not namespaced (the built-in API's; a CRD's own scope is in its spec).
CLUSTER_SCOPED = frozenset(
    {
        "APIService",
        "CertificateSigningRequest",
        "ClusterRole",
        "ClusterRoleBinding",
        "ComponentStatus",
        "CSIDriver",
        "CSINode",
        "CustomResourceDefinition",
        "FlowSchema",
        "IngressClass",
        "MutatingWebhookConfiguration",
        "Namespace",
        "Node",
        "PersistentVolume",
        "PriorityClass",
        "PriorityLevelConfiguration",
        "RuntimeClass",
        "StorageClass",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "ValidatingWebhookConfiguration",
        "VolumeAttachment",
    }
)
# Workloads whose readiness ``kubectl rollout status`` waits for.
ROLLOUT_KINDS = ("Deployment", "StatefulSet", "DaemonSet")


@dataclass
class KubernetesResult:
    passed: bool
    description: str
    metrics: dict[str, Any] = field(default_factory=dict)


def restored_files(tree: Path, patterns: list[str]) -> list[tuple[str, Path]]:
    """The files under a restored tree whose archived (absolute) path matches ``patterns``, as
    (archived path, restored path), sorted."""
    regex = patterns_regex(patterns)
    found: list[tuple[str, Path]] = []
    for directory, folders, names in os.walk(tree):
        folders.sort()
        for name in sorted(names):
            path = Path(directory) / name
            if path.is_symlink() or not path.is_file():
                continue
            archived = "/" + path.relative_to(tree).as_posix()
            if regex is not None and regex.match(archived):
                found.append((archived, path))
    return sorted(found)


def _objects(archived: str, path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Every object of a manifest file (``List`` items unfolded), labelled ``file#n``; raises
    ``ValueError`` naming the file for YAML that does not parse or a document that is not an
    object."""
    try:
        with open(path, encoding="utf-8") as handle:
            documents = [d for d in yaml.safe_load_all(handle) if d is not None]
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{archived}: not YAML: {first}") from None
    found: list[tuple[str, dict[str, Any]]] = []
    for index, document in enumerate(documents, 1):
        label = f"{archived}#{index}"
        if not isinstance(document, dict) or "kind" not in document:
            raise ValueError(f"{label}: not a Kubernetes object (no kind)")
        if str(document["kind"]).endswith("List") and isinstance(document.get("items"), list):
            found.extend((f"{label}.{n}", item) for n, item in enumerate(document["items"], 1))
        else:
            found.append((label, document))
    return found


def _name(document: dict[str, Any]) -> str:
    metadata = document.get("metadata") if isinstance(document.get("metadata"), dict) else {}
    return f"{document.get('kind')}/{metadata.get('name', '?')}"


def validate_manifests(
    tree: Path, settings: KubernetesDrill
) -> tuple[list[tuple[str, dict[str, Any]]], list[str], int]:
    """Validate every object of the matching files offline; returns the objects, the errors (one
    line each, naming file, document and object) and the number of files read."""
    import kubernetes_validate

    files = restored_files(tree, settings.manifests)
    objects: list[tuple[str, dict[str, Any]]] = []
    errors: list[str] = []
    for archived, path in files:
        try:
            found = _objects(archived, path)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        for label, document in found:
            try:
                kubernetes_validate.validate(
                    document, settings.kubernetes_version, strict=settings.strict
                )
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path) or "(object)"
                errors.append(f"{label} {_name(document)}: {where}: {exc.message}")
                continue
            except (
                kubernetes_validate.SchemaNotFoundError,
                kubernetes_validate.InvalidSchemaError,
            ) as exc:
                errors.append(f"{label} {_name(document)}: {str(exc).splitlines()[0]}")
                continue
            objects.append((label, document))
    return objects, errors, len(files)


def drill_namespace(prefix: str, now: dt.datetime) -> str:
    """``<prefix>-<UTC date and time>-<4 hex>``: two drills started in the same second (the
    monthly drills of several sources) never pick the same name."""
    return f"{prefix}-{now.astimezone(dt.UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


class Kubectl:
    """``kubectl`` with the plan's context, every call bounded by ``timeout``."""

    def __init__(self, cluster: KubernetesCluster):
        self.cluster = cluster
        self.calls: list[list[str]] = []

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [self.cluster.kubectl]
        if self.cluster.context:
            argv += ["--context", self.cluster.context]
        argv += list(args)
        self.calls.append(argv[1:])
        try:
            return subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=tool_environment() | _kube_environment(),
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError:
            raise RuntimeError(f"kubectl not found: {self.cluster.kubectl}") from None
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"kubectl {args[0]} did not finish within {timeout:.0f}s") from None

    def check(self, *args: str, timeout: float = 60) -> str:
        result = self.run(*args, timeout=timeout)
        if result.returncode != 0:
            message = first_error(result.stderr.splitlines(), result.returncode)
            raise RuntimeError(f"kubectl {' '.join(args[:2])}: {message}")
        return result.stdout


def _kube_environment() -> dict[str, str]:
    """kubectl finds its cluster through $KUBECONFIG (a path, never a secret itself)."""
    return {k: v for k, v in os.environ.items() if k == "KUBECONFIG"}


def namespaced_documents(
    objects: list[tuple[str, dict[str, Any]]],
) -> tuple[list[dict[str, Any]], list[str]]:
    """The objects to apply into the drill's namespace (``metadata.namespace`` removed), and the
    names of the cluster-scoped ones left out."""
    applied: list[dict[str, Any]] = []
    skipped: list[str] = []
    for _label, document in objects:
        if document.get("kind") in CLUSTER_SCOPED:
            skipped.append(_name(document))
            continue
        copy = dict(document)
        metadata = dict(copy.get("metadata") or {})
        metadata.pop("namespace", None)
        copy["metadata"] = metadata
        applied.append(copy)
    return applied, skipped


def apply_in_namespace(
    cluster: KubernetesCluster,
    objects: list[tuple[str, dict[str, Any]]],
    scratch: Path,
    now: dt.datetime,
) -> KubernetesResult:
    """Apply the namespaced objects into a fresh namespace, wait for their rollouts, delete the
    namespace (only if this drill created it)."""
    kubectl = Kubectl(cluster)
    namespace = drill_namespace(cluster.namespace_prefix, now)
    wait = cluster.ready_timeout.total_seconds()
    applied, skipped = namespaced_documents(objects)
    metrics: dict[str, Any] = {
        "namespace": namespace,
        "applied": len(applied),
        "cluster_scoped_skipped": len(skipped),
    }
    created = False
    problem: str | None = None
    try:
        existing = kubectl.run("get", "namespace", namespace, "-o", "name")
        if existing.returncode == 0:
            return KubernetesResult(
                False,
                f"namespace {namespace} already exists: not the drill's own, left untouched",
                metrics,
            )
        if "notfound" not in existing.stderr.replace(" ", "").lower():
            message = first_error(existing.stderr.splitlines(), existing.returncode)
            return KubernetesResult(False, f"kubectl get namespace: {message}", metrics)
        kubectl.check("create", "namespace", namespace)
        created = True
        if applied:
            manifest = scratch / "kubectl-apply.yaml"
            with open(manifest, "w", encoding="utf-8") as handle:
                yaml.safe_dump_all(applied, handle, sort_keys=False)
            try:
                kubectl.check("apply", "--namespace", namespace, "-f", str(manifest), timeout=wait)
            finally:
                manifest.unlink(missing_ok=True)
            for document in applied:
                if document.get("kind") in ROLLOUT_KINDS:
                    kubectl.check(
                        "rollout",
                        "status",
                        "--namespace",
                        namespace,
                        f"{str(document['kind']).lower()}/{document['metadata']['name']}",
                        f"--timeout={int(wait)}s",
                        timeout=wait + 30,
                    )
    except RuntimeError as exc:
        problem = str(exc)
    finally:
        if created:
            try:
                kubectl.check("delete", "namespace", namespace, "--wait=true", timeout=wait + 30)
            except RuntimeError as exc:
                problem = (problem + "; " if problem else "") + f"namespace not deleted: {exc}"
    metrics["kubectl_calls"] = len(kubectl.calls)
    if problem:
        return KubernetesResult(False, f"namespace {namespace}: {problem}", metrics)
    return KubernetesResult(
        True,
        f"{len(applied)} objects applied into {namespace}, ready, namespace deleted"
        + (f" ({len(skipped)} cluster-scoped left out)" if skipped else ""),
        metrics,
    )


def kubernetes_drill(
    tree: Path, settings: KubernetesDrill, scratch: Path, now: dt.datetime
) -> KubernetesResult:
    objects, errors, files = validate_manifests(tree, settings)
    metrics: dict[str, Any] = {
        "manifest_files": files,
        "objects": len(objects) + len(errors),
        "invalid": len(errors),
    }
    version = settings.kubernetes_version
    if not files:
        return KubernetesResult(
            False, f"no restored file matches {', '.join(settings.manifests)}", metrics
        )
    if errors:
        shown = "; ".join(errors[:3]) + (f" and {len(errors) - 3} more" if len(errors) > 3 else "")
        return KubernetesResult(
            False, f"{len(errors)} invalid for Kubernetes {version}: {shown}", metrics
        )
    described = f"{len(objects)} objects in {files} manifests valid for Kubernetes {version}"
    if settings.cluster is None:
        return KubernetesResult(True, described + " (offline; no cluster in the plan)", metrics)
    applied = apply_in_namespace(settings.cluster, objects, scratch, now)
    return KubernetesResult(
        applied.passed, f"{described}; {applied.description}", metrics | applied.metrics
    )
