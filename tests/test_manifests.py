"""Both kustomizations as ``kubectl kustomize`` renders them, every object validated against
the Kubernetes schemas (kubernetes-validate, strict: an unknown field fails) of two
Kubernetes versions: 1.29, the first to run the sidecar's native sidecar container by
default, and a recent one. The Prometheus Operator's kinds have no schema there: the
PrometheusRule's rules go through promtool, the ServiceMonitor through the schema below.

Without kubectl these tests skip, saying so; under CI (``CI=true``) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
KUBE = REPO / "deploy" / "kubernetes"
VARIANTS = ("shared", "sidecar")
KUBERNETES_VERSIONS = ("1.29.0", "1.35.0")
RENDER_SECONDS = 60

# The Prometheus Operator's ServiceMonitor, as far as the manifest uses it (strict: the
# fields it may hold at each level; monitoring.coreos.com/v1).
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object"}},
                },
                "namespaceSelector": {"type": "object"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scheme": {"enum": ["http", "https"]},
                        },
                    },
                },
            },
        },
    },
}


def _need(tool: str) -> str:
    """The tool's path; skip without it, but fail under CI, where it must be installed."""
    path = shutil.which(tool)
    if path is not None:
        return path
    message = (
        f"{tool} is not installed: the manifests under deploy/kubernetes were not rendered or"
        f" validated (install {tool}; scripts/test-deps.sh says how)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@cache
def _render(variant: str, workdir: str) -> str:
    """``kubectl kustomize`` of a copy of ``variant``, its secrets.env from the example."""
    folder = Path(workdir) / variant
    shutil.copytree(KUBE / variant, folder)
    (folder / "secrets.env").write_text(
        (folder / "secrets.env.example").read_text(encoding="utf-8"), encoding="utf-8"
    )
    done = subprocess.run(
        [_need("kubectl"), "kustomize", str(folder)],
        capture_output=True,
        text=True,
        timeout=RENDER_SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    _need("kubectl")
    workdir = str(tmp_path_factory.mktemp("kustomize"))
    return {v: [d for d in yaml.safe_load_all(_render(v, workdir)) if d] for v in VARIANTS}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_is_valid_kubernetes(
    rendered: dict[str, list[dict[str, Any]]], variant: str, version: str
) -> None:
    checked = []
    for doc in rendered[variant]:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # the Prometheus Operator's: below
        kubernetes_validate.validate(doc, version, strict=True)
        checked.append(doc["kind"])
    assert {"Deployment", "ConfigMap", "Secret", "NetworkPolicy"} <= set(checked), checked


def test_the_renders_hold_what_the_docs_say(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kinds = {v: sorted(d["kind"] for d in docs) for v, docs in rendered.items()}
    assert kinds["shared"] == sorted(
        [
            "ConfigMap",
            "Deployment",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "PrometheusRule",
            "Secret",
            "Service",
            "ServiceMonitor",
        ]
    )
    assert kinds["sidecar"] == sorted(
        ["ConfigMap", "Deployment", "NetworkPolicy", "PersistentVolumeClaim", "Secret"]
    )


def test_the_prometheus_operator_objects_are_valid(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    operator = [d for d in rendered["shared"] if d["apiVersion"].startswith("monitoring.")]
    (monitor,) = [d for d in operator if d["kind"] == "ServiceMonitor"]
    jsonschema.validate(monitor, SERVICE_MONITOR)
    (rule,) = [d for d in operator if d["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}), encoding="utf-8")
    done = subprocess.run(
        [_need("promtool"), "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=RENDER_SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_validation_has_teeth(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """A misspelt field and a wrong type are refused, in both versions."""
    (deployment,) = [d for d in rendered["shared"] if d["kind"] == "Deployment"]
    for version in KUBERNETES_VERSIONS:
        typo = {**deployment, "spec": {**deployment["spec"], "replica": 3}}
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(typo, version, strict=True)
        wrong = {**deployment, "spec": {**deployment["spec"], "replicas": "three"}}
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(wrong, version, strict=True)
    (monitor,) = [d for d in rendered["shared"] if d["kind"] == "ServiceMonitor"]
    bad = {**monitor, "spec": {**monitor["spec"], "selectr": {}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SERVICE_MONITOR)


def test_the_sidecar_policy_opens_only_the_admin_port_to_prometheus(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["sidecar"]
    (policy,) = [d["spec"] for d in docs if d["kind"] == "NetworkPolicy"]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]
    selector = policy["podSelector"]["matchLabels"]
    assert selector and all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items())
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert [p["port"] for p in rule["ports"]] == ["admin"]
    (gateway,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "echowin-gateway"]
    assert {"name": "admin", "containerPort": 9090} in gateway["ports"]
    (peer,) = rule["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
