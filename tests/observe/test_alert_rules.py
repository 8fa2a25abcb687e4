"""The alert rules as an alert's receiver uses them (issue 21, point 4): absolute runbook
URLs, the upstream-error and state-reset alerts firing (and not) in promtool's own rule
tests, and the PrometheusRule manifest rendered from the same rules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from tests.observe.test_observability import ALERTS, REPO, alert_rules, promtool_test_alert

PROMETHEUS_RULE = REPO / "deploy" / "kubernetes" / "shared" / "prometheusrule.yaml"


def render_rules() -> ModuleType:
    """scripts/render_rules.py, imported as a module."""
    path = REPO / "scripts" / "render_rules.py"
    spec = importlib.util.spec_from_file_location("render_rules", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["render_rules"] = module
    spec.loader.exec_module(module)
    return module


def test_runbook_urls_are_absolute_under_the_documented_base() -> None:
    base = render_rules().default_base()
    assert base.startswith("https://") and base.endswith("/docs/operations.md")
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["annotations"]["runbook_url"] == f"{base}#{name.lower()}", name


def test_the_checked_in_files_are_what_a_render_writes() -> None:
    """alerts.yml and the PrometheusRule cannot drift apart (or from pyproject's URL)."""
    rules = render_rules()
    alerts, manifest = rules.render(rules.default_base())
    assert ALERTS.read_text(encoding="utf-8") == alerts
    assert PROMETHEUS_RULE.read_text(encoding="utf-8") == manifest
    rule = yaml.safe_load(manifest)
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(alerts)["groups"]
    kustomization = yaml.safe_load((PROMETHEUS_RULE.parent / "kustomization.yaml").read_text())
    assert "prometheusrule.yaml" in kustomization["resources"]


def test_another_runbook_base_moves_every_url() -> None:
    rules = render_rules()
    base = "https://wiki.example.com/egw/operations"
    alerts, manifest = rules.render(base)
    groups = yaml.safe_load(alerts)["groups"]
    urls = [r["annotations"]["runbook_url"] for g in groups for r in g["rules"]]
    assert urls and all(u.startswith(base + "#echowingateway") for u in urls)
    assert base in manifest
    assert "# Alerting rules for echowin-gateway" in alerts  # the comments stay
    with pytest.raises(ValueError, match="--runbook-base"):
        rules.render("docs/operations.md")


def upstream(ok: float, bad: float, errors: float, kind: str = "timeout") -> dict[str, str]:
    """One credential's counters, rising by these amounts a minute for 30 minutes."""
    series = {}
    if ok:
        series['echowin_gateway_upstream_responses_total{credential="default",status="200"}'] = (
            f"0+{ok:g}x30"
        )
    if bad:
        series['echowin_gateway_upstream_responses_total{credential="default",status="503"}'] = (
            f"0+{bad:g}x30"
        )
    if errors:
        series[f'echowin_gateway_upstream_errors_total{{credential="default",kind="{kind}"}}'] = (
            f"0+{errors:g}x30"
        )
    return series


@pytest.mark.parametrize(
    ("series", "fires"),
    [
        (upstream(ok=100, bad=10, errors=0), True),  # echowin's 5xx alone
        (upstream(ok=100, bad=0, errors=10), True),  # timeouts alone (no 5xx series at all)
        (upstream(ok=0, bad=0, errors=3, kind="connect"), True),  # echowin unreachable
        (upstream(ok=100, bad=1, errors=1), False),  # 2%: below the 5% threshold
        (upstream(ok=0, bad=0, errors=0.2), False),  # 100%, but 2 in 10 minutes: too few
        (upstream(ok=100, bad=0, errors=0), False),
    ],
)
def test_upstream_errors_alert(tmp_path: Path, series: dict[str, str], fires: bool) -> None:
    labels = {"credential": "default"} if fires else {}
    result = promtool_test_alert(tmp_path, "EchowinGatewayUpstreamErrors", series, "25m", labels)
    assert result.returncode == 0, result.stdout + result.stderr
