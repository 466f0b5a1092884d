#!/usr/bin/env python3
"""Every Secret the rendered chart uses must exist before it is installed: a missing one leaves
a pod in CreateContainerConfigError (and a run pod failing its run after run monitoring's start
timeout). Reads rendered manifests and names each Secret they use that is not there.

    helm template spark-backup dagster/dagster --version 1.13.27 -f deploy/helm/values.yaml \\
      | python3 deploy/helm/check_secrets.py --namespace spark-backup        # asks kubectl
    helm template ... | python3 deploy/helm/check_secrets.py --defined deploy/helm/secrets.example.yaml

Exit status 0 when every Secret is there, 1 (one line per missing Secret, naming the objects
that use it) otherwise. Needs PyYAML; kubectl only without --defined.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml


def _pod_specs(manifest: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = manifest.get("spec") or {}
    if manifest.get("kind") == "Pod":
        yield spec
    template = spec.get("template") or spec.get("jobTemplate", {}).get("spec", {}).get("template")
    if template and template.get("spec"):
        yield template["spec"]


def used_secrets(manifests: Iterable[dict[str, Any]]) -> dict[str, set[str]]:
    """Secret name -> the objects (``Kind/name``) that use it: through envFrom, env's
    secretKeyRef, a secret volume or an image pull secret (optional references do not count)."""
    used: dict[str, set[str]] = defaultdict(set)
    for manifest in manifests:
        if not isinstance(manifest, dict):
            continue
        owner = f"{manifest.get('kind')}/{(manifest.get('metadata') or {}).get('name')}"
        for pod in _pod_specs(manifest):
            for ref in pod.get("imagePullSecrets") or []:
                used[ref["name"]].add(owner)
            for volume in pod.get("volumes") or []:
                if "secret" in volume:
                    used[volume["secret"]["secretName"]].add(owner)
            for container in (pod.get("containers") or []) + (pod.get("initContainers") or []):
                for source in container.get("envFrom") or []:
                    if "secretRef" in source and not source["secretRef"].get("optional"):
                        used[source["secretRef"]["name"]].add(owner)
                for variable in container.get("env") or []:
                    ref = (variable.get("valueFrom") or {}).get("secretKeyRef")
                    if ref and not ref.get("optional"):
                        used[ref["name"]].add(owner)
    return dict(used)


def defined_secrets(manifests: Iterable[dict[str, Any]]) -> set[str]:
    return {
        m["metadata"]["name"]
        for m in manifests
        if isinstance(m, dict) and m.get("kind") == "Secret"
    }


def missing(used: dict[str, set[str]], exists) -> list[str]:
    """One line per used Secret that ``exists(name)`` denies."""
    return [
        f"Secret {name!r} is missing; used by {', '.join(sorted(owners))}"
        for name, owners in sorted(used.items())
        if not exists(name)
    ]


def _in_cluster(namespace: str):
    def exists(name: str) -> bool:
        result = subprocess.run(
            ["kubectl", "get", "secret", "-n", namespace, name, "-o", "name"],
            capture_output=True,
            text=True,
        )
        return result.returncode == 0

    return exists


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--namespace", help="ask kubectl whether each Secret exists there")
    where.add_argument("--defined", type=Path, help="a manifest file that defines the Secrets")
    args = parser.parse_args(argv)
    rendered = list(yaml.safe_load_all(sys.stdin))
    # The chart's own Secrets (rendered with it) exist once it is installed.
    chart_made = defined_secrets(rendered)
    if args.defined:
        there = defined_secrets(yaml.safe_load_all(args.defined.read_text())) | chart_made
        exists = there.__contains__
    else:
        in_cluster = _in_cluster(args.namespace)

        def exists(name: str) -> bool:
            return name in chart_made or in_cluster(name)

    problems = missing(used_secrets(rendered), exists)
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
