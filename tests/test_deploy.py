"""The shipped deployment files agree with each other and with the gateway's own schema.

Dockerfile, Kubernetes manifests (sidecar and shared) and the compose stack are parsed
here and checked against ``proxy.config``: the configs they carry validate, and ports,
probes, env names, replica counts, mounts and grace periods line up. hadolint and yamllint
run in ``make lint``; these are the checks a linter cannot make.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import BaseModel

from proxy.config import GatewayConfig, SecretRef, parse_address, parse_config

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
GATEWAY = "echowin-gateway"  # the container, Deployment and console-script name
VARIANTS = ("sidecar", "shared")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


# --- shared helpers ----------------------------------------------------------------------


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document is a mapping"
    return docs


def env_refs(node: object) -> set[str]:
    """Every environment variable a config reads through ``{env: NAME}``."""
    if isinstance(node, SecretRef):
        return {node.env} if node.env is not None else set()
    if isinstance(node, BaseModel):
        return set().union(*(env_refs(getattr(node, f)) for f in type(node).model_fields))
    if isinstance(node, dict):
        return set().union(*(env_refs(v) for v in node.values()))
    if isinstance(node, tuple | list):
        return set().union(*(env_refs(v) for v in node))
    return set()


def sqlite_dir(config: GatewayConfig) -> str | None:
    """The directory of an absolute sqlite state path; None for other backends."""
    if not config.state.startswith("sqlite:///"):
        return None
    path = "/" + config.state.removeprefix("sqlite:///").lstrip("/")
    return str(PurePosixPath(path).parent)


def port_of(address: str) -> int:
    return parse_address(address)[1]


def host_of(address: str) -> str:
    return parse_address(address)[0]


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|k|M|G)?$")
_FACTOR = {None: 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
_FACTOR.update({"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30})


def quantity(value: object) -> float:
    """A Kubernetes resource quantity (``100m``, ``256Mi``, ``1``) as a number."""
    match = _QUANTITY.match(str(value))
    assert match, f"not a resource quantity: {value!r}"
    return float(match.group(1)) * _FACTOR[match.group(2)]


@cache
def project() -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return data


# --- the Dockerfile ----------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends in a continuation"
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def one(stage: list[tuple[str, str]], word: str) -> str:
    found = [rest for w, rest in stage if w == word]
    assert len(found) == 1, f"expected one {word} in the final stage, found {len(found)}"
    return found[0]


def image_config_path() -> tuple[str, Path]:
    """(path in the image, source in the repository) of the default config."""
    cmd = exec_form(one(final_stage(), "CMD"))
    path = cmd[cmd.index("--config") + 1]
    for word, rest in final_stage():
        if word == "COPY" and not rest.startswith("--from"):
            source, dest = rest.split()[-2:]
            if dest == path:
                return path, ROOT / source
    raise AssertionError(f"the final stage does not COPY a file to {path}")


def test_dockerfile_is_multi_stage_on_a_slim_python() -> None:
    froms = [rest for word, rest in dockerfile() if word == "FROM"]
    assert len(froms) >= 2, "build and runtime stages"
    for base in froms:
        image = base.split()[0]
        assert image.startswith("python:3.11") and "slim" in image, image
    assert any(word == "COPY" and rest.startswith("--from=") for word, rest in final_stage())


def test_dockerfile_runs_as_a_non_root_user() -> None:
    user = one(final_stage(), "USER").split(":")[0]
    assert user not in ("root", "0", ""), user
    assert user == str(dockerfile_uid())


def dockerfile_uid() -> int:
    user = one(final_stage(), "USER").split(":")[0]
    assert user.isdigit(), "USER is numeric, so runAsNonRoot can verify it"
    return int(user)


def test_dockerfile_entrypoint_serves_the_default_config() -> None:
    assert exec_form(one(final_stage(), "ENTRYPOINT")) == [GATEWAY]
    assert GATEWAY in project()["scripts"]
    cmd = exec_form(one(final_stage(), "CMD"))
    assert cmd[0] == "serve" and "--config" in cmd
    _, source = image_config_path()
    parse_config(yaml.safe_load(source.read_text()), str(source))


def test_dockerfile_ports_volume_and_healthcheck_match_its_config() -> None:
    _, source = image_config_path()
    config = parse_config(yaml.safe_load(source.read_text()))
    exposed = {int(p.split("/")[0]) for p in one(final_stage(), "EXPOSE").split()}
    assert exposed == {8080, 9090} == {port_of(config.listen), port_of(config.admin_listen)}
    assert host_of(config.admin_listen) == "0.0.0.0", "probes come from outside the container"
    volumes = exec_form(one(final_stage(), "VOLUME"))
    assert volumes == [sqlite_dir(config)] == ["/var/lib/echowin-gateway"]
    health = one(final_stage(), "HEALTHCHECK")
    assert health.split("CMD", 1)[0].strip(), "interval, timeout and retries are set"
    url = ""
    for word, rest in final_stage():
        if word == "ENV":
            found = re.search(r"GATEWAY_HEALTHCHECK_URL=(\S+)", rest)
            url = found.group(1) if found else url
    probe = url if "GATEWAY_HEALTHCHECK_URL" in health else health
    found_url = re.search(r"https?://[^\s'\"]+", probe)
    assert found_url, "the HEALTHCHECK calls an http URL"
    parts = urlsplit(found_url.group(0))
    assert (parts.hostname, parts.port, parts.path) == (
        "127.0.0.1",
        port_of(config.admin_listen),
        "/healthz",
    )


def test_dockerfile_installs_only_the_package() -> None:
    """The locked runtime dependencies (the redis, postgres and fast extras:
    tests/test_lockfile.py), then the package alone, built from the context; nothing of
    [dev]."""
    runs = " ".join(rest for word, rest in dockerfile() if word == "RUN")
    assert re.search(r"--require-hashes\s+--no-deps -r requirements\.lock", runs), runs
    assert re.search(r"pip wheel .*--no-deps .*\.\s", runs), "the package, built from ."
    assert "[dev]" not in runs and "requirements-dev" not in runs


def test_dockerignore_lets_every_copied_path_in() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert patterns[0] == "*", "an allowlist: everything else stays out of the context"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for word, rest in dockerfile():
        if word != "COPY" or rest.startswith("--from"):
            continue
        for source in rest.split()[:-1]:
            source = source.rstrip("/").removeprefix("./")
            assert (ROOT / source).exists(), source
            assert any(source == a or source.startswith(a + "/") for a in allowed), source
    for secretish in (".venv", ".run", ".git", "deploy/kubernetes/shared/secrets.env"):
        assert not any(secretish == a or secretish.startswith(a + "/") for a in allowed)


# --- Kubernetes --------------------------------------------------------------------------


@cache
def kustomization(variant: str) -> dict[str, Any]:
    (doc,) = load_yaml_docs(KUBE / variant / "kustomization.yaml")
    assert doc["kind"] == "Kustomization"
    return doc


def manifests(variant: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in kustomization(variant)["resources"]:
        docs += load_yaml_docs(KUBE / variant / name)
    return docs


def the(variant: str, kind: str) -> dict[str, Any]:
    found = [d for d in manifests(variant) if d["kind"] == kind]
    assert len(found) == 1, f"{variant}: expected one {kind}, found {len(found)}"
    return found[0]


def generator(variant: str, section: str, name: str) -> dict[str, Any]:
    found = [g for g in kustomization(variant).get(section, []) if g["name"] == name]
    assert len(found) == 1, f"{variant}: {section} {name}"
    return found[0]


CONFIGMAP = "echowin-gateway-config"
SECRET = "echowin-gateway-secrets"


def gateway_config(variant: str) -> GatewayConfig:
    """The config the ConfigMap carries, validated by the gateway's own parser."""
    (file,) = generator(variant, "configMapGenerator", CONFIGMAP)["files"]
    path = KUBE / variant / file
    return parse_config(yaml.safe_load(path.read_text()), str(path))


def secret_keys(variant: str) -> set[str]:
    """The keys of the Secret, from the example env file operators copy."""
    (env_file,) = generator(variant, "secretGenerator", SECRET)["envs"]
    keys = set()
    for line in (KUBE / variant / f"{env_file}.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and value, f"{variant}/{env_file}.example: {line!r}"
            keys.add(key.strip())
    return keys


def pod_spec(variant: str) -> dict[str, Any]:
    spec: dict[str, Any] = the(variant, "Deployment")["spec"]["template"]["spec"]
    return spec


def gateway_container(variant: str) -> dict[str, Any]:
    spec = pod_spec(variant)
    found = [
        c
        for c in spec.get("containers", []) + spec.get("initContainers", [])
        if c["name"] == GATEWAY
    ]
    assert len(found) == 1
    container = found[0]
    if container in spec.get("initContainers", []):
        assert container.get("restartPolicy") == "Always", "an init container is a native sidecar"
    return container


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A port given by number or by name, as the container's port number."""
    for entry in container.get("ports", []):
        if port in (entry["containerPort"], entry.get("name")):
            return int(entry["containerPort"])
    raise AssertionError(f"{container['name']} declares no port {port!r}")


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_labels(variant: str) -> dict[str, str]:
    labels: dict[str, str] = the(variant, "Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.mark.parametrize("variant", VARIANTS)
def test_kustomization_lists_every_file(variant: str) -> None:
    folder = KUBE / variant
    k = kustomization(variant)
    generated = {f for g in k.get("configMapGenerator", []) for f in g.get("files", [])}
    yaml_files = {p.name for p in folder.iterdir() if p.suffix in (".yaml", ".yml")}
    assert yaml_files - {"kustomization.yaml"} - generated == set(k["resources"])
    for name in k["resources"]:
        assert (folder / name).is_file(), name
    for name in generated:
        assert (folder / name).is_file(), name
    for g in k.get("secretGenerator", []):
        for env_file in g.get("envs", []):
            assert (folder / f"{env_file}.example").is_file(), f"{env_file}.example"
            ignored = (folder / ".gitignore").read_text().split()
            assert env_file in ignored, f"{variant}/{env_file} holds real keys: git-ignore it"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_manifest_names_itself(variant: str) -> None:
    docs = manifests(variant)
    assert docs
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), doc
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_image_is_the_package_version(variant: str) -> None:
    (image,) = kustomization(variant)["images"]
    assert image["name"] == gateway_container(variant)["image"] == GATEWAY
    assert str(image["newTag"]) == project()["version"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_container_serves_the_mounted_config(variant: str) -> None:
    container = gateway_container(variant)
    args = container["args"]
    assert args[0] == "serve"
    path = PurePosixPath(args[args.index("--config") + 1])
    volumes = {v["name"]: v for v in pod_spec(variant)["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    mount = mounts[str(path.parent)]
    assert volumes[mount["name"]]["configMap"]["name"] == CONFIGMAP
    (file,) = generator(variant, "configMapGenerator", CONFIGMAP)["files"]
    assert path.name == PurePosixPath(file).name, "the ConfigMap key is the file's name"


@pytest.mark.parametrize("variant", VARIANTS)
def test_ports_agree_with_the_config(variant: str) -> None:
    config = gateway_config(variant)
    container = gateway_container(variant)
    assert container_port(container, "admin") == port_of(config.admin_listen)
    assert host_of(config.admin_listen) == "0.0.0.0", "kubelet probes reach the pod's IP"
    listen_port = port_of(config.listen)
    if host_of(config.listen) in LOOPBACK:
        declared = {p["containerPort"] for p in container.get("ports", [])}
        assert listen_port not in declared, "a loopback-only proxy is no container port"
    else:
        assert container_port(container, "proxy") == listen_port


def test_sidecar_app_calls_the_gateway_on_loopback() -> None:
    config = gateway_config("sidecar")
    assert host_of(config.listen) in LOOPBACK, "only the app in the pod may call it"
    apps = [c for c in pod_spec("sidecar")["containers"] if c["name"] != GATEWAY]
    assert apps, "the sidecar sits beside an app container"
    env = {e["name"]: e for e in apps[0]["env"]}
    base = urlsplit(env["ECHOWIN_BASE_URL"]["value"])
    assert (base.hostname, base.port) == (host_of(config.listen), port_of(config.listen))
    assert base.path == "/api/v1"
    assert "secretKeyRef" in env["ECHOWIN_API_KEY"]["valueFrom"], "the app's gateway token"


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_hit_the_admin_port(variant: str) -> None:
    config = gateway_config(variant)
    container = gateway_container(variant)
    expected = {
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
        "startupProbe": "/healthz",
    }
    for probe, path in expected.items():
        if probe == "startupProbe" and probe not in container:
            continue
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert container_port(container, get["port"]) == port_of(config.admin_listen), probe


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_secret_the_config_reads_comes_from_the_secret(variant: str) -> None:
    config = gateway_config(variant)
    wanted = env_refs(config)
    assert "ECHOWIN_API_KEY" in wanted
    if config.state.startswith(("redis://", "rediss://")):
        assert config.redis.password is not None and config.redis.password.env in wanted
    env = {e["name"]: e for e in gateway_container(variant).get("env", [])}
    keys = secret_keys(variant)
    for name in wanted:
        assert name in env, f"{variant}: the config reads ${name}, the container lacks it"
        ref = env[name].get("valueFrom", {}).get("secretKeyRef")
        assert ref is not None, f"{variant}: {name} must come from the Secret, not a literal"
        assert ref["name"] == SECRET and ref["key"] in keys, f"{variant}: {name}"
    for entry in env.values():
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None and ref["name"] == SECRET:
            assert ref["key"] in keys, f"{variant}: Secret key {ref['key']} missing"


@pytest.mark.parametrize("variant", VARIANTS)
def test_replicas_match_the_config(variant: str) -> None:
    config = gateway_config(variant)
    spec = the(variant, "Deployment")["spec"]
    assert spec["replicas"] == config.replicas
    state_dir = sqlite_dir(config)
    if state_dir is not None:
        # One sqlite file: one pod, never two at once, on a volume that outlives the pod.
        assert config.replicas == 1 and spec["strategy"]["type"] == "Recreate"
        mounts = {m["mountPath"]: m["name"] for m in gateway_container(variant)["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(variant)["volumes"]}
        claim = volumes[mounts[state_dir]]["persistentVolumeClaim"]["claimName"]
        the_claim = the(variant, "PersistentVolumeClaim")
        assert the_claim["metadata"]["name"] == claim
    else:
        assert config.state.startswith(("redis://", "rediss://"))
        # A rollout never runs more pods than `replicas:` (each spends 1/replicas alone).
        assert spec["strategy"]["rollingUpdate"]["maxSurge"] == 0
        assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] >= 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_termination_grace_covers_the_drain(variant: str) -> None:
    config = gateway_config(variant)
    container = gateway_container(variant)
    pre_stop = 0.0
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    if command:
        assert command[0] == "sleep"
        pre_stop = float(command[1])
    grace = pod_spec(variant)["terminationGracePeriodSeconds"]
    assert grace > pre_stop + config.server.shutdown_grace_seconds


@pytest.mark.parametrize("variant", VARIANTS)
def test_runs_locked_down_with_bounded_resources(variant: str) -> None:
    spec = pod_spec(variant)
    container = gateway_container(variant)
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == dockerfile_uid() == spec["securityContext"]["fsGroup"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert spec["automountServiceAccountToken"] is False
    resources = container["resources"]
    for kind in ("cpu", "memory"):
        request = quantity(resources["requests"][kind])
        limit = quantity(resources["limits"][kind])
        assert 0 < request <= limit, kind


def test_shared_runs_three_replicas_on_redis() -> None:
    config = gateway_config("shared")
    assert config.replicas == 3 == the("shared", "Deployment")["spec"]["replicas"]
    assert config.state.startswith(("redis://", "rediss://"))
    assert config.on_state_failure == "local"


def test_shared_service_reaches_both_listeners() -> None:
    service = the("shared", "Service")
    container = gateway_container("shared")
    config = gateway_config("shared")
    assert labels_match(service["spec"]["selector"], pod_labels("shared"))
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert container_port(container, by_name["proxy"]["targetPort"]) == port_of(config.listen)
    assert container_port(container, by_name["admin"]["targetPort"]) == port_of(config.admin_listen)


def test_shared_network_policy_admits_labelled_clients_only() -> None:
    policy = the("shared", "NetworkPolicy")["spec"]
    container = gateway_container("shared")
    config = gateway_config("shared")
    assert labels_match(policy["podSelector"]["matchLabels"], pod_labels("shared"))
    assert "Ingress" in policy["policyTypes"]
    proxy_port = port_of(config.listen)
    proxy_peers = []
    for rule in policy["ingress"]:
        assert rule.get("from"), "a rule without `from` admits everyone"
        assert rule.get("ports"), "a rule without `ports` opens every port"
        ports = {container_port(container, p["port"]) for p in rule["ports"]}
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            assert peer.get("podSelector", {}).get("matchLabels"), "peers are labelled pods"
        if proxy_port in ports:
            assert ports == {proxy_port}, "clients reach the proxy, not the admin port"
            proxy_peers += rule["from"]
    assert proxy_peers, "somebody may call the proxy"
    for peer in proxy_peers:
        labels = peer["podSelector"]["matchLabels"]
        assert not labels_match(labels, pod_labels("shared")), "a client label, not ours"
        assert "namespaceSelector" not in peer or peer["namespaceSelector"].get("matchLabels")


def test_shared_pdb_keeps_a_quorum_and_allows_a_drain() -> None:
    pdb = the("shared", "PodDisruptionBudget")["spec"]
    replicas = the("shared", "Deployment")["spec"]["replicas"]
    assert labels_match(pdb["selector"]["matchLabels"], pod_labels("shared"))
    assert ("minAvailable" in pdb) != ("maxUnavailable" in pdb)
    if "minAvailable" in pdb:
        disruptions = replicas - int(pdb["minAvailable"])
        assert int(pdb["minAvailable"]) >= 2
    else:
        disruptions = int(pdb["maxUnavailable"])
    assert 1 <= disruptions < replicas, "one at a time can go, never all"


def test_shared_service_monitor_scrapes_the_admin_port() -> None:
    monitor = the("shared", "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = the("shared", "Service")
    assert labels_match(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    target = by_name[endpoint["port"]]["targetPort"]
    port = container_port(gateway_container("shared"), target)
    assert port == port_of(gateway_config("shared").admin_listen)


# --- compose -----------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    (doc,) = load_yaml_docs(COMPOSE_FILE)
    return doc


def service(name: str) -> dict[str, Any]:
    services: dict[str, Any] = compose()["services"]
    assert name in services, f"compose has no service {name}"
    found: dict[str, Any] = services[name]
    return found


def mounts(name: str) -> Iterator[tuple[str, str]]:
    """(source, target) of a service's volumes, short or long syntax."""
    for entry in service(name).get("volumes", []):
        if isinstance(entry, dict):
            yield entry["source"], entry["target"]
        else:
            source, target = entry.split(":")[:2]
            yield source, target


def bind_source(name: str, target: str) -> Path:
    for source, where in mounts(name):
        if where == target:
            assert source.startswith((".", "/")), f"{name}:{target} is not a bind mount"
            return (COMPOSE_DIR / source).resolve()
    raise AssertionError(f"{name} mounts nothing at {target}")


def compose_config() -> GatewayConfig:
    cmd = service("gateway")["command"]
    path = bind_source("gateway", cmd[cmd.index("--config") + 1])
    return parse_config(yaml.safe_load(path.read_text()), str(path))


def environment(name: str) -> dict[str, str]:
    env = service(name).get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def published(name: str) -> dict[int, str]:
    """container port -> host address, for a service's published ports."""
    out = {}
    for entry in service(name).get("ports", []):
        parts = str(entry).split(":")
        host_ip = parts[0] if len(parts) == 3 else "0.0.0.0"
        assert parts[-2].isdigit() and parts[-1].isdigit(), entry
        out[int(parts[-1])] = host_ip
    return out


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_compose_runs_the_whole_stack() -> None:
    services = set(compose()["services"])
    wanted = {"gateway", "redis", "simulator", "prometheus", "grafana", "load", "token-init"}
    assert wanted <= services
    assert "version" not in compose(), "the compose spec dropped `version:`"
    for name in ("gateway", "simulator", "token-init"):
        assert service(name)["build"]["context"] == "../.."
        assert (COMPOSE_DIR / service(name)["build"]["context"] / "Dockerfile").is_file()


def test_every_bind_mount_exists_and_named_volumes_are_declared() -> None:
    declared = set(compose().get("volumes") or {})
    for name in compose()["services"]:
        for source, target in mounts(name):
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
            assert target.startswith("/"), target


def test_compose_gateway_config_validates_and_ports_agree() -> None:
    config = compose_config()
    ports = published("gateway")
    assert set(ports) == {port_of(config.listen), port_of(config.admin_listen)}
    assert host_of(config.admin_listen) == "0.0.0.0", "Prometheus scrapes it from its container"
    assert all(
        ip == "127.0.0.1" for name in compose()["services"] for ip in published(name).values()
    )


def test_compose_gateway_finds_redis_and_the_simulator() -> None:
    config = compose_config()
    state = urlsplit(config.state)
    assert state.scheme == "redis" and state.hostname in compose()["services"]
    assert (state.port or 6379) == 6379 and "redis" in service(state.hostname)["image"]
    upstream = urlsplit(config.upstream.base_url)
    sim = service("simulator")["command"]
    assert sim[0] == "simulate" and option(sim, "--host") == "0.0.0.0"
    assert (upstream.hostname, upstream.port) == ("simulator", int(option(sim, "--port")))
    env = environment("gateway")
    assert env["ECHOWIN_API_KEY"] == option(sim, "--key"), "the simulator accepts the key"
    limits = [f"{lim.requests}/{lim.per_seconds:g}" for lim in config.upstream.limits]
    sim_limits = [sim[i + 1] for i, word in enumerate(sim) if word == "--limit"]
    assert (sim_limits or ["1000/3600", "100/60"]) == limits, "the simulator keeps our limits"


def test_compose_provides_every_secret_the_config_reads() -> None:
    config = compose_config()
    for name in ("gateway", "token-init"):
        env = environment(name)
        for var in env_refs(config) - {"GATEWAY_ADMIN_TOKEN"}:
            assert var in env, f"{name} lacks {var}"
    assert "GATEWAY_ADMIN_TOKEN" in environment("gateway")
    redis_cmd = " ".join(service("redis")["command"])
    assert "--requirepass" in redis_cmd and "REDIS_PASSWORD" in environment("redis")


def test_compose_load_reads_the_token_token_init_writes() -> None:
    init = " ".join(service("token-init")["command"])
    assert "echowin-gateway token create" in init
    written = re.findall(r"> *(\S+)", init)[-1]
    moved_to = re.search(r"mv \S+ (\S+)", init)
    token_path = PurePosixPath(moved_to.group(1) if moved_to else written)
    init_volumes = {target: source for source, target in mounts("token-init")}
    volume = init_volumes[str(token_path.parent)]
    load_path = PurePosixPath(environment("load")["TOKEN_FILE"])
    load_volumes = {target: source for source, target in mounts("load")}
    assert load_volumes[str(load_path.parent)] == volume and load_path.name == token_path.name
    depends = service("load")["depends_on"]
    assert depends["token-init"]["condition"] == "service_completed_successfully"
    assert depends["gateway"]["condition"] == "service_healthy"
    entry = service("load")["entrypoint"]
    script = bind_source("load", entry[-1])
    text = script.read_text()
    assert "sleep" in text and "LOAD_REQUESTS" in text, "the load is paced and bounded"
    assert urlsplit(environment("load")["GATEWAY_URL"]).port == port_of(compose_config().listen)


def test_compose_stop_grace_covers_the_drain() -> None:
    grace = service("gateway")["stop_grace_period"]
    assert grace.endswith("s")
    assert float(grace[:-1]) > compose_config().server.shutdown_grace_seconds


def test_prometheus_scrapes_the_gateway_and_loads_the_rules() -> None:
    config_path = bind_source("prometheus", "/etc/prometheus/prometheus.yml")
    rules_target = "/etc/prometheus/alerts.yml"
    assert bind_source("prometheus", rules_target) == (ROOT / "deploy/prometheus/alerts.yml")
    assert config_path == ROOT / "deploy/prometheus/prometheus.yml"
    (prom,) = load_yaml_docs(config_path)
    rule_files = [str(PurePosixPath("/etc/prometheus") / f) for f in prom.get("rule_files", [])]
    assert rules_target in rule_files
    targets = {
        t
        for job in prom["scrape_configs"]
        for sc in job.get("static_configs", [])
        for t in sc["targets"]
    }
    assert f"gateway:{port_of(compose_config().admin_listen)}" in targets


def test_grafana_provisions_prometheus_and_the_dashboard() -> None:
    (sources,) = load_yaml_docs(
        bind_source("grafana", "/etc/grafana/provisioning/datasources/echowin-gateway.yml")
    )
    (source,) = sources["datasources"]
    url = urlsplit(source["url"])
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert url.hostname == "prometheus" and url.port == 9090
    assert url.hostname in compose()["services"]
    (providers,) = load_yaml_docs(
        bind_source("grafana", "/etc/grafana/provisioning/dashboards/echowin-gateway.yml")
    )
    (provider,) = providers["providers"]
    folder = PurePosixPath(provider["options"]["path"])
    dashboards = [t for s, t in mounts("grafana") if t.endswith(".json")]
    assert dashboards and all(PurePosixPath(t).parent == folder for t in dashboards)
    dashboard_file = bind_source("grafana", dashboards[0])
    assert dashboard_file == ROOT / "deploy/grafana/echowin-gateway.json"
    dashboard = json.loads(dashboard_file.read_text())
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    uids = set(re.findall(r'"uid":\s*"([^"]+)"', json.dumps(dashboard_refs(dashboard))))
    for uid in uids:
        name = uid.strip("${}")
        assert uid == source["uid"] or name in variables or uid == "-- Grafana --", uid
    home = environment("grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home in dashboards


def dashboard_refs(node: object) -> list[object]:
    """Every `datasource` value in a dashboard."""
    found: list[object] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                found.append(value)
            found += dashboard_refs(value)
    elif isinstance(node, list):
        for value in node:
            found += dashboard_refs(value)
    return found


def test_compose_image_runs_commands_through_the_entrypoint() -> None:
    # ENTRYPOINT is `echowin-gateway`: a service's command is the subcommand and its options.
    assert service("gateway")["command"][:2] == ["serve", "--config"]
    assert service("simulator")["command"][0] == "simulate"
