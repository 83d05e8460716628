#!/usr/bin/env python3
"""Write infra/k8s/base/monitoring/prometheusrule.yaml from infra/prometheus/alerts.yaml (the one to edit).

    python infra/prometheus/sync_rule.py           rewrite the PrometheusRule
    python infra/prometheus/sync_rule.py --check   exit 1 if it is out of date (infra/check runs this)
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

INFRA = Path(__file__).resolve().parent.parent
ALERTS = INFRA / "prometheus" / "alerts.yaml"
RULE = INFRA / "k8s" / "base" / "monitoring" / "prometheusrule.yaml"
HEADER = """\
# GENERATED from infra/prometheus/alerts.yaml by infra/prometheus/sync_rule.py: do not edit by hand.
# The Prometheus Operator loads these alert rules (your Prometheus must select them: ruleSelector, RUNBOOK.md).
"""


class _Dumper(yaml.SafeDumper):
    """Block style with indented sequences (as yamllint wants) and multi-line strings as literal blocks."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        return super().increase_indent(flow, False)


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    rules = yaml.safe_load(ALERTS.read_text())
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "microturn", "labels": {"app.kubernetes.io/part-of": "microturn"}},
        "spec": rules,
    }
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100, indent=2, default_flow_style=False)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not RULE.exists() or RULE.read_text() != text:
            print(f"{RULE.relative_to(INFRA.parent)} is out of date: run python infra/prometheus/sync_rule.py",
                  file=sys.stderr)
            return 1
        return 0
    RULE.write_text(text)
    print(f"wrote {RULE.relative_to(INFRA.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
