#!/usr/bin/env python3
"""Write deploy/k8s/components/monitoring/prometheusrule.yaml from deploy/prometheus/alerts.yml, so
Kubernetes (Prometheus Operator) and the compose Prometheus load the same rules.

    python deploy/prometheus/make_prometheusrule.py           # rewrite it
    python deploy/prometheus/make_prometheusrule.py --check   # exit 1 if it is out of date (tests run this)
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1]
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
RULE = DEPLOY / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"
HEAD = """\
# GENERATED from deploy/prometheus/alerts.yml: edit that file, then run
#   python deploy/prometheus/make_prometheusrule.py
# (tests/unit/test_deploy.py fails while this file is out of date).
"""


class _Dumper(yaml.SafeDumper):
    pass


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _text)


def render() -> str:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "farm", "labels": {"app.kubernetes.io/name": "farm"}},
        "spec": {"groups": groups},
    }
    return HEAD + yaml.dump(rule, Dumper=_Dumper, sort_keys=False, width=120)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not RULE.exists() or RULE.read_text() != text:
            print(f"{RULE} is out of date: run python {Path(__file__).relative_to(DEPLOY.parent)}", file=sys.stderr)
            return 1
        return 0
    RULE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
