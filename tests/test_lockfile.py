"""The image is reproducible (issue 21, point 7): its base pinned by digest, its
dependencies installed from lock files that match pyproject.toml, and OCI labels that say
what it is. Checked without the network: the lock files' top-level entries against the
declared requirements (names, versions within the ranges, markers, hashes)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.test_deploy import dockerfile, final_stage

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
BUILD_LOCK = ROOT / "requirements-build.lock"
EXTRAS = ("redis", "postgres", "fast")  # what the image installs (Dockerfile)
FROM_PYPROJECT = "echowin-gateway (pyproject.toml)"
FROM_BUILD_SYSTEM = "echowin-gateway (pyproject.toml::build-system.requires)"


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    hashes: tuple[str, ...]
    via: tuple[str, ...]


@cache
def pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def parse_lock(path: Path) -> dict[str, Pin]:
    """pip-compile's output: ``name==version \\`` then ``--hash=sha256:...`` lines, then
    ``# via X`` or ``# via`` with one ``#   X`` line per requirer."""
    pins: dict[str, Pin] = {}
    entries = re.split(r"\n(?=[A-Za-z0-9])", path.read_text(encoding="utf-8"))
    for entry in entries:
        head = re.match(r"([A-Za-z0-9._-]+)==(\S+)", entry)
        if head is None:
            continue
        via = re.findall(r"#\s+via (\S.*)", entry) + re.findall(r"#\s{3,}(\S.*)", entry)
        pins[canonicalize_name(head[1])] = Pin(
            canonicalize_name(head[1]),
            head[2],
            tuple(re.findall(r"--hash=sha256:([0-9a-f]{64})", entry)),
            tuple(v.strip() for v in via),
        )
    return pins


def declared() -> list[Requirement]:
    """The image's requirements: the dependencies and the extras it installs, for Linux."""
    project = pyproject()["project"]
    assert isinstance(project, dict)
    texts = list(project["dependencies"])
    for extra in EXTRAS:
        texts += project["optional-dependencies"][extra]
    env = {"sys_platform": "linux", "platform_system": "Linux", "python_version": "3.11"}
    reqs = [Requirement(t) for t in texts]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def check_lock(pins: dict[str, Pin], requirements: list[Requirement], top: str) -> None:
    wanted = {canonicalize_name(r.name): r for r in requirements}
    at_top = {name for name, pin in pins.items() if top in pin.via}
    assert at_top == set(wanted), (
        f"lock file out of date: declared but not locked {sorted(set(wanted) - at_top)},"
        f" locked but no longer declared {sorted(at_top - set(wanted))} (re-run pip-compile:"
        " the Dockerfile's header says how)"
    )
    for name, req in wanted.items():
        pin = pins[name]
        assert req.specifier.contains(pin.version, prereleases=True), (
            f"{name}=={pin.version} is outside pyproject's {req.specifier}: re-run pip-compile"
        )
    for pin in pins.values():
        assert pin.hashes, f"{pin.name} has no hash: pip --require-hashes would refuse it"
        assert pin.via, f"{pin.name}: nothing requires it"


def test_the_lock_holds_exactly_the_declared_runtime_requirements() -> None:
    pins = parse_lock(LOCK)
    check_lock(pins, declared(), FROM_PYPROJECT)
    assert "--extra=fast --extra=postgres --extra=redis" in LOCK.read_text(encoding="utf-8")
    assert not {"pytest", "ruff", "mypy", "hypothesis"} & set(pins), "no dev tools in the image"


def test_the_build_lock_holds_the_build_system() -> None:
    build = pyproject()["build-system"]
    assert isinstance(build, dict)
    check_lock(
        parse_lock(BUILD_LOCK), [Requirement(r) for r in build["requires"]], FROM_BUILD_SYSTEM
    )


def test_the_check_catches_a_stale_lock(tmp_path: Path) -> None:
    pins = parse_lock(LOCK)
    requirements = declared()
    with pytest.raises(AssertionError, match="declared but not locked"):
        check_lock(pins, [*requirements, Requirement("httpx>=0.27")], FROM_PYPROJECT)
    narrowed = [
        Requirement("aiohttp>=9") if canonicalize_name(r.name) == "aiohttp" else r
        for r in requirements
    ]
    with pytest.raises(AssertionError, match="outside pyproject"):
        check_lock(pins, narrowed, FROM_PYPROJECT)
    unhashed = tmp_path / "lock"
    unhashed.write_text("pyyaml==6.0.4\n    # via echowin-gateway (pyproject.toml)\n")
    with pytest.raises(AssertionError, match="no hash"):
        check_lock(parse_lock(unhashed), [Requirement("PyYAML>=6")], FROM_PYPROJECT)


def test_the_base_is_pinned_by_digest_on_every_stage() -> None:
    bases = {rest.split()[0] for word, rest in dockerfile() if word == "FROM"}
    assert len(bases) == 1, f"one base for both stages: {bases}"
    (base,) = bases
    assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", base), base
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "docker buildx imagetools inspect python:3.11-slim-bookworm" in text, "how to bump"


def test_the_image_installs_from_the_locks_only() -> None:
    runs = [rest for word, rest in dockerfile() if word == "RUN"]
    installs = [r for r in runs if "install" in r]
    for lock in ("requirements-build.lock", "requirements.lock"):
        pattern = rf"--require-hashes\s+--no-deps\s+-r\s+{re.escape(lock)}"
        assert any(re.search(pattern, r) for r in installs), lock
    package = [r for r in runs if "pip wheel" in r]
    assert package and "--no-build-isolation" in package[0] and "--no-index" in package[0]
    allowed = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert {"!requirements.lock", "!requirements-build.lock"} <= set(allowed)


def test_the_image_says_what_it_is() -> None:
    stage = final_stage()
    args = dict(rest.split("=", 1) for word, rest in stage if word == "ARG" and "=" in rest)
    project = pyproject()["project"]
    assert isinstance(project, dict)
    assert args["VERSION"] == project["version"], "the image's version is the package's"
    assert args["REVISION"] == "unknown"
    labels = " ".join(rest for word, rest in stage if word == "LABEL")
    found = dict(re.findall(r'(org\.opencontainers\.image\.[a-z.]+)="([^"]*)"', labels))
    assert found["org.opencontainers.image.version"] == "${VERSION}"
    assert found["org.opencontainers.image.revision"] == "${REVISION}"
    assert found["org.opencontainers.image.source"] == project["urls"]["Repository"]
    env = " ".join(rest for word, rest in stage if word == "ENV")
    assert "ECHOWIN_GATEWAY_REVISION=${REVISION}" in env, "build_info's revision label"
