#!/usr/bin/env python3
"""Validate one rendered kustomize build (a multi-document YAML file) offline.

    python infra/tools/validate_manifests.py RENDERED.yaml [--kubernetes-version 1.32.0]

1. kubernetes-validate --strict against the built-in schemas of that Kubernetes version. Any ERROR fails; the only
   WARN allowed is "no schema" for the custom resources listed in CUSTOM, and only as many as there are of them.
2. Those custom resources (ServiceMonitor, PrometheusRule) against the JSON schemas in infra/schemas/.
3. Every Grafana dashboard ConfigMap (label grafana_dashboard) holds JSON with panels.
Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import yaml

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
CUSTOM = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.json",
}
NO_SCHEMA = re.compile(r"^WARN\b.*Couldn't find schema for kind (\w+) with api version (\S+) for kubernetes version")


def kubernetes_validate(path: Path, version: str) -> tuple[list[str], dict[tuple[str, str], int]]:
    """Problems found by kubernetes-validate, and how many "no schema" warnings each (apiVersion, kind) got."""
    proc = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "--kubernetes-version", version, "-"],
        stdin=path.open("rb"), capture_output=True, text=True, check=False)
    problems, unknown = [], {}
    for line in (proc.stdout + proc.stderr).splitlines():
        if not line.strip():
            continue
        match = NO_SCHEMA.match(line)
        if match and (match.group(2), match.group(1)) in CUSTOM:
            key = (match.group(2), match.group(1))
            unknown[key] = unknown.get(key, 0) + 1
        else:  # an ERROR, or any other warning: none is ignored
            problems.append(f"kubernetes-validate: {line}")
    if proc.returncode != 0 and not problems:
        problems.append(f"kubernetes-validate exited {proc.returncode}")
    return problems, unknown


def validate(path: Path, version: str) -> list[str]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    if not docs:
        return [f"{path}: no objects (did the kustomize build fail?)"]
    problems, unknown = kubernetes_validate(path, version)
    custom: dict[tuple[str, str], int] = {}
    for doc in docs:
        key = (doc.get("apiVersion", ""), doc.get("kind", ""))
        name = f"{key[1]}/{doc.get('metadata', {}).get('name')}"
        if key in CUSTOM:
            custom[key] = custom.get(key, 0) + 1
            schema = json.loads((SCHEMAS / CUSTOM[key]).read_text())
            for error in jsonschema.Draft7Validator(schema).iter_errors(doc):
                where = ".".join(str(p) for p in error.absolute_path) or "(root)"
                problems.append(f"{name}: {where}: {error.message}")
        if key == ("v1", "ConfigMap") and "grafana_dashboard" in doc.get("metadata", {}).get("labels", {}):
            for file, text in doc.get("data", {}).items():
                try:
                    dashboard = json.loads(text)
                except json.JSONDecodeError as exc:
                    problems.append(f"{name}: {file} is not JSON: {exc}")
                    continue
                if not dashboard.get("panels"):
                    problems.append(f"{name}: {file} has no panels")
    if unknown != custom:
        problems.append(f"custom resources without a built-in schema {unknown} != those in the build {custom}")
    print(f"  {len(docs)} objects: {len(docs) - sum(custom.values())} checked by kubernetes-validate {version} "
          f"(strict), {sum(custom.values())} custom resources by infra/schemas")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rendered", type=Path)
    parser.add_argument("--kubernetes-version", default="1.32.0")
    args = parser.parse_args()
    problems = validate(args.rendered, args.kubernetes_version)
    for problem in problems:
        print(f"  FAIL {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
