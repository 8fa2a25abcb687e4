"""/metrics as scrapers ask for it (issue 21, point 3): the standard process_* beside the
gateway's own, build_info with its revision, OpenMetrics on Accept and gzip on
Accept-Encoding; against the real admin listener, checked by prometheus_client's parsers
and, where installed, promtool."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__
from proxy.observe import build
from proxy.observe.metrics import expose
from tests.conftest import GatewayHandle

REPO = Path(__file__).resolve().parents[2]
OPENMETRICS = "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5"


async def scrape(gw: GatewayHandle, **headers: str) -> tuple[aiohttp.ClientResponse, bytes]:
    """/metrics, with no Accept-Encoding but the one given (aiohttp sends gzip by default)."""
    headers = {"Accept-Encoding": "identity"} | headers
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.get(gw.admin_url("/metrics"), headers=headers) as resp,
    ):
        return resp, await resp.read()


def promtool_accepts(page: bytes) -> None:
    if shutil.which("promtool") is None:
        return
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=page, capture_output=True, check=False
    )
    assert b"error" not in checked.stderr.lower(), checked.stderr[-2000:]


async def test_text_format_has_process_metrics_and_build_info(gateway: GatewayHandle) -> None:
    resp, body = await scrape(gateway)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "Content-Encoding" not in resp.headers
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds"):
        assert name in families, sorted(families)
    assert not [n for n in families if n.startswith("echowin_gateway_process_")]
    (info,) = families["echowin_gateway_build_info"].samples
    assert info.labels == {"version": __version__, "revision": build.revision()}
    promtool_accepts(body)


async def test_openmetrics_when_accept_asks(gateway: GatewayHandle) -> None:
    token = await gateway.token("contacts:read")
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {token}"}
        async with session.get(gateway.url("/api/v1/contacts"), headers=headers) as resp:
            assert resp.status == 200
    resp, body = await scrape(gateway, Accept=OPENMETRICS)
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert "Accept" in resp.headers["Vary"]
    text = body.decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(text)}
    requests = families["echowin_gateway_requests"]
    assert requests.type == "counter"
    assert sum(s.value for s in requests.samples if s.name.endswith("_total")) >= 1
    assert "process_cpu_seconds" in families
    promtool_accepts(body)


@pytest.mark.parametrize("accept", [None, OPENMETRICS])
async def test_gzip_when_accept_encoding_allows(gateway: GatewayHandle, accept: str | None) -> None:
    plain_resp, plain = await scrape(gateway, **({"Accept": accept} if accept else {}))
    headers = {"Accept-Encoding": "gzip"} | ({"Accept": accept} if accept else {})
    resp, body = await scrape(gateway, **headers)
    assert resp.headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in resp.headers["Vary"]
    assert resp.headers["Content-Type"] == plain_resp.headers["Content-Type"]
    inflated = gzip.decompress(body)
    assert len(body) < len(inflated)
    # The same families as the plain page (values move between two scrapes).
    names = [
        line.split()[2] for line in inflated.decode().splitlines() if line.startswith("# TYPE")
    ]
    plain_names = [
        line.split()[2] for line in plain.decode().splitlines() if line.startswith("# TYPE")
    ]
    assert names == plain_names
    resp, _ = await scrape(gateway, **{"Accept-Encoding": "gzip;q=0, identity"})
    assert "Content-Encoding" not in resp.headers


def test_a_tiny_page_is_not_compressed() -> None:
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    Gauge("tiny", "A small page.", registry=registry).set(1)
    answer = expose(registry, None, "gzip")
    assert "Content-Encoding" not in answer.headers


def test_revision_from_the_environment_then_git_then_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    build.revision.cache_clear()
    try:
        monkeypatch.setenv(build.REVISION_ENV, "0123abcd" * 5)
        assert build.revision() == "0123abcd" * 5
        build.revision.cache_clear()
        monkeypatch.setenv(build.REVISION_ENV, "not a revision; rm -rf")
        assert build.revision() == build.UNKNOWN
        build.revision.cache_clear()
        monkeypatch.delenv(build.REVISION_ENV)
        if (REPO / ".git").exists() and shutil.which("git"):
            head = subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            assert build.revision() == head
        build.revision.cache_clear()
        monkeypatch.setattr(build, "_CHECKOUT", REPO / "no-such-checkout")
        assert build.revision() == build.UNKNOWN
    finally:
        build.revision.cache_clear()
