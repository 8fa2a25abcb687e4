"""Point the alert rules' runbook_url at a docs base, and write the Prometheus Operator's
PrometheusRule from them.

    python scripts/render_rules.py [--runbook-base URL]

deploy/prometheus/alerts.yml is the rules' source (plain Prometheus reads it as it is).
Every ``runbook_url`` there becomes ``URL#<alert name in lower case>``: URL defaults to
``operations.md`` under the Documentation URL of pyproject.toml's ``[project.urls]``; give
your own copy of docs/operations.md (a wiki page, an internal docs site) instead. Then
deploy/kubernetes/shared/prometheusrule.yaml is written from the same rules, so the two
never differ (tests/test_deploy.py checks that a render changes nothing).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS_RULE = ROOT / "deploy" / "kubernetes" / "shared" / "prometheusrule.yaml"
_RUNBOOK = re.compile(r'^([ ]*runbook_url: )"([^"#]*)#([^"]+)"[ \t]*$', re.MULTILINE)
_HEADER = """\
# Written by scripts/render_rules.py from deploy/prometheus/alerts.yml (the rules' source, with
# their comments): edit that file and render again, never this one.
# For the Prometheus Operator (CRD monitoring.coreos.com/v1), beside servicemonitor.yaml.
# Your Prometheus selects PrometheusRules by label (ruleSelector; kube-prometheus-stack:
# release: <name>): add that label here, as on the ServiceMonitor. Without the operator, drop
# this file from kustomization.yaml and load alerts.yml into Prometheus' rule_files.
"""


def default_base(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """``operations.md`` under pyproject's Documentation URL."""
    urls = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["urls"]
    return str(urls["Documentation"]).rstrip("/") + "/operations.md"


def with_runbook_base(text: str, base: str) -> str:
    """``text`` (alerts.yml) with every runbook_url's part before ``#`` set to ``base``."""
    if '"' in base or "#" in base or not re.match(r"https?://", base):
        raise ValueError(f"--runbook-base: an http(s) URL without quotes or '#', got {base!r}")

    def one(match: re.Match[str]) -> str:
        return f'{match[1]}"{base}#{match[3]}"'

    return _RUNBOOK.sub(one, text)


class _Dumper(yaml.SafeDumper):
    """Block scalars for text of several lines (the expressions), as in alerts.yml; lists
    indented under their key (yamllint's default)."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def prometheus_rule(alerts: str) -> str:
    """The PrometheusRule manifest holding the groups of ``alerts`` (alerts.yml's text)."""
    groups: list[dict[str, Any]] = yaml.safe_load(alerts)["groups"]
    manifest = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "echowin-gateway",
            "labels": {"app.kubernetes.io/name": "echowin-gateway"},
        },
        "spec": {"groups": groups},
    }
    body = yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=120, indent=2)
    return _HEADER + body


def render(base: str) -> tuple[str, str]:
    """(alerts.yml, prometheusrule.yaml) as they should be for ``base``."""
    alerts = with_runbook_base(ALERTS.read_text(encoding="utf-8"), base)
    return alerts, prometheus_rule(alerts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--runbook-base", default=None, help="default: " + default_base())
    args = parser.parse_args(argv)
    try:
        alerts, rule = render(args.runbook_base or default_base())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ALERTS.write_text(alerts, encoding="utf-8")
    PROMETHEUS_RULE.write_text(rule, encoding="utf-8")
    print(f"wrote {ALERTS.relative_to(ROOT)} and {PROMETHEUS_RULE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
