"""The observability proof: the Grafana dashboard and the Prometheus alert rules.

- ``promtool check rules`` passes on deploy/prometheus/alerts.yml, and every PromQL
  expression of the dashboard and the rules parses (each one becomes a recording rule in a
  scratch file that promtool checks);
- the real gateway (Redis state, so the state-backend metrics exist) in front of the real
  simulator runs a short load with 401s, 403s, token-quota and budget refusals, queue waits,
  an upstream reset and an upstream 429; every metric the dashboard and the rules name is on
  its /metrics, and every metric on /metrics is documented and on the dashboard;
- a real Prometheus (the Debian package) scrapes that gateway every second and evaluates the
  rules: every dashboard query returns data and every rule evaluates cleanly.

promtool and prometheus must be installed (.ci/run installs them): without them these tests
FAIL, never skip.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.observe.metrics import Metrics
from proxy.sim import Faults
from tests.conftest import GatewayHandle, SimHandle
from tests.procs import free_ports
from tests.state.redis.test_replicas import RedisServer, redis_server, wait_redis_up  # noqa: F401
from tests.state.test_token_store import REDIS_URL, scratch_redis

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "echowin-gateway.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
RUNBOOK = REPO / "docs" / "operations.md"
METRICS_DOC = REPO / "docs" / "metrics.md"

JOB = "echowin-gateway"
# Grafana's variables, as substituted for the parse check and for the live queries.
ALL = {"token": ".*", "route": ".*", "credential": ".*"}  # every value "All" selected
PARSE_VARS = {"__rate_interval": "1m", "__range": "1h", **ALL}
LIVE_VARS = {"__rate_interval": "10s", "__range": "1m", **ALL}
# Series that Prometheus itself makes for every target, not the gateway.
SYNTHETIC = {"up"}
# Only the supervisor of `serve --workers N` exports these (tests/workers/test_workers.py).
GROUP_ONLY = {"echowin_gateway_worker_restarts_total"}

MakeGateway = Callable[..., Awaitable[GatewayHandle]]
Query = tuple[str, str]  # (where it comes from, PromQL)


# --- the artefacts --------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def graph_panels() -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard()["panels"]) if p["type"] != "row"]


def dashboard_queries() -> list[Query]:
    return [
        (f"panel {p['title']!r} target {t['refId']}", t["expr"])
        for p in graph_panels()
        for t in p["targets"]
    ]


def variable_queries() -> list[tuple[str, str, str]]:
    """(variable, metric, label) of every ``label_values(metric, label)`` variable."""
    out = []
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", query)
        assert match, f"variable {var['name']}: unexpected query {query!r}"
        out.append((var["name"], match[1], match[2]))
    return out


def rule_queries() -> list[Query]:
    return [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana's ``$name`` and ``${name}``; an unknown variable fails the test."""

    def one(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        assert name in values, f"unknown variable ${name} in {expr!r}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`""")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, keywords dropped)."""
    rest = _STRING.sub('""', expr)
    rest = _MATCHERS.sub("", rest)
    rest = _RANGE.sub("", rest)
    rest = _GROUPING.sub("", rest)
    return {m[1] for m in _IDENT.finditer(rest) if m[2] is None and m[1].lower() not in _KEYWORDS}


def test_metric_names_finds_selectors_only() -> None:
    expr = (
        'sum by (le, token) (rate(a_bucket{token=~"$token", x="by(y)"}[5m] offset 1h))'
        " / on (credential) group_left () b_total > 0.99 and c or vector(1) unless bool d"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d"}


def exposed(text: str) -> tuple[set[str], set[str]]:
    """The sample names on a /metrics page, and its metric names as a reader queries them:
    counters with ``_total``, histograms by their base name, without prometheus_client's
    ``_created`` companions."""
    samples = set()
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        elif line and not line.startswith("#"):
            samples.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    names = set()
    for name, kind in types.items():
        base = name.removesuffix("_created")
        if name != base and (
            {base, f"{base}_total"} & {n for n, k in types.items() if k != "gauge"}
        ):
            continue
        names.add(f"{name}_total" if kind == "counter" and not name.endswith("_total") else name)
    return samples, names


# --- tools ----------------------------------------------------------------------------------


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: apt-get install prometheus (.ci/run does)", pytrace=False
        )
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """``promtool ARGS``, its output captured (bounded in time)."""
    return subprocess.run(
        [binary("promtool"), *args], capture_output=True, text=True, timeout=60, check=False
    )


def promtool_check_rules(path: Path) -> subprocess.CompletedProcess[str]:
    return promtool("check", "rules", str(path))


def recording_rules(queries: list[Query]) -> dict[str, Any]:
    rules = [{"record": f"check:expr_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)]
    return {"groups": [{"name": "parse-check", "rules": rules}]}


# --- static checks --------------------------------------------------------------------------


def test_promtool_accepts_the_alert_rules() -> None:
    result = promtool_check_rules(ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_every_expression_parses(tmp_path: Path) -> None:
    queries = [
        (where, substitute(expr, PARSE_VARS)) for where, expr in dashboard_queries()
    ] + rule_queries()
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump(recording_rules(queries)), encoding="utf-8")
    result = promtool_check_rules(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout
    # The check has teeth: a broken expression makes promtool fail.
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump(recording_rules([("bad", "sum(rate(x[5m])")])), "utf-8")
    assert promtool_check_rules(bad).returncode != 0


def test_dashboard_shape() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 38
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("token", "route"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    assert {v for v, _, _ in variable_queries()} >= {"token", "route"}
    source = {"type": "prometheus", "uid": "${datasource}"}
    top = board["panels"]
    assert top[0]["type"] == "row", "panels are grouped in rows, starting with one"
    ids = [p["id"] for p in all_panels(top)]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in all_panels(top):
        assert panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["description"], panel["title"]
        assert panel["datasource"] == source, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source, panel["title"]
            assert target["expr"].strip(), panel["title"]
    rows = {p["title"] for p in top if p["type"] == "row"}
    assert {"Overview", "Upstream budget", "Queue", "Per token", "Upstream (echowin)"} <= rows


def target_unit(panel: dict[str, Any], ref_id: str) -> str | None:
    """The unit Grafana shows a target's series in: an override by its refId, else the
    panel's default."""
    config = panel.get("fieldConfig", {})
    for override in config.get("overrides", []):
        matcher = override["matcher"]
        if matcher["id"] == "byFrameRefID" and matcher["options"] == ref_id:
            for prop in override["properties"]:
                if prop["id"] == "unit":
                    return str(prop["value"])
    unit = config.get("defaults", {}).get("unit")
    return None if unit is None else str(unit)


_SHARE = re.compile(r"\b(echowin_gateway_\w+)_used\b.*\)\s*/\s*.*\b\1_limit\b", re.DOTALL)


def test_shares_of_a_limit_show_as_percent() -> None:
    """A ``..._used / ..._limit`` query is a share (0 to 1): shown in another unit (e.g.
    req/s next to a rate in the same panel) a half-spent quota reads "0.5 req/s"."""
    shares = [
        (panel["title"], target["refId"])
        for panel in graph_panels()
        for target in panel["targets"]
        if _SHARE.search(target["expr"])
    ]
    assert len(shares) >= 2  # Budget used, Token quota use
    wrong = {
        (title, ref): target_unit(panel, ref)
        for panel in graph_panels()
        for title, ref in shares
        if panel["title"] == title and target_unit(panel, ref) != "percentunit"
    }
    assert not wrong, wrong


def test_alerts_carry_severity_summary_description_and_a_runbook() -> None:
    runbook = RUNBOOK.read_text(encoding="utf-8").split("\n## Alert runbook\n", 1)[1]
    sections = re.findall(r"^### (\S+)\s*$", runbook, re.MULTILINE)
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    assert sorted(sections) == sorted(names), "one runbook section per alert"
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        notes = rule["annotations"]
        assert notes["summary"].strip() and notes["description"].strip(), name
        assert notes["runbook_url"].endswith(f"/operations.md#{name.lower()}"), name
        body = runbook.split(f"### {name}", 1)[1].split("\n### ", 1)[0]
        assert len(body.strip()) > 200, f"runbook section {name} is too thin"


def test_prometheus_config_for_the_compose_stack(tmp_path: Path) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == JOB
    assert job["static_configs"] == [{"targets": ["gateway:9090"]}]
    # promtool validates it, with the rule file where this checkout keeps it.
    config["rule_files"] = [str(ALERTS)]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = promtool("check", "config", str(local))
    assert result.returncode == 0, result.stdout + result.stderr


def promtool_test_alert(
    tmp_path: Path, alert: str, series: dict[str, str], fires_at: str, labels: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """``promtool test rules``: whether ``alert`` of alerts.yml (its expr, for and labels;
    annotations left out, they hold rendered values) fires at ``fires_at`` on ``series``
    (one sample a minute), with ``labels``; ``labels`` empty: it must not fire."""
    (rule,) = [r for r in alert_rules() if r["alert"] == alert]
    bare = {k: v for k, v in rule.items() if k != "annotations"}
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [bare]}]}), "utf-8")
    expected = [{"exp_labels": {**rule["labels"], **labels}}] if labels else []
    test = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "alert_rule_test": [
                    {"eval_time": fires_at, "alertname": alert, "exp_alerts": expected}
                ],
            }
        ],
    }
    path = tmp_path / "test.yml"
    path.write_text(yaml.safe_dump(test), encoding="utf-8")
    return promtool("test", "rules", str(path))


def queue_wait_series(max_wait: float, waited: float) -> dict[str, str]:
    """The series a gateway with ``queue.max_wait_seconds: max_wait`` exports while 100
    requests a minute wait ``waited`` seconds each: its real buckets, from a real
    ``Metrics``."""
    metrics = Metrics()
    metrics.queue_max_wait.set(max_wait)
    for _ in range(100):
        metrics.waited("default", waited)
    text = metrics.exposition().decode()
    series = {"echowin_gateway_queue_max_wait_seconds": f"{max_wait}x30"}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "echowin_gateway_queue_wait_seconds_bucket":
                selector = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                series[f"{s.name}{{{selector}}}"] = f"0+{s.value:g}x30"
    return series


@pytest.mark.parametrize("max_wait", [10, 120, 600, 3600])
def test_queue_wait_alert_fires_near_any_max_wait(tmp_path: Path, max_wait: int) -> None:
    """EchowinGatewayQueueWaitNearMax compares the wait p99 with 0.8 x the configured max
    wait: the histogram's buckets must reach that far, or the p99 stops at the highest one
    and the alert can never fire."""
    alert = "EchowinGatewayQueueWaitNearMax"
    near = queue_wait_series(max_wait, 0.95 * max_wait)
    result = promtool_test_alert(tmp_path, alert, near, "15m", {"credential": "default"})
    assert result.returncode == 0, result.stdout + result.stderr
    half = queue_wait_series(max_wait, 0.5 * max_wait)
    result = promtool_test_alert(tmp_path, alert, half, "15m", {})
    assert result.returncode == 0, result.stdout + result.stderr


# --- live: gateway, load, Prometheus --------------------------------------------------------

LIMITS = [{"requests": 30, "per_seconds": 10}, {"requests": 10, "per_seconds": 2}]
LOAD_SECONDS = 8.0
STARTUP_SECONDS = 20.0
DATA_SECONDS = 25.0


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A fresh key prefix on the test Redis, cleaned after the gateway has stopped."""
    async with scratch_redis() as (_, prefix):
        yield prefix


@dataclass
class Prometheus:
    popen: subprocess.Popen[bytes]
    port: int
    log: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            log = self.log.read_text(encoding="utf-8", errors="replace")
            pytest.fail(f"prometheus exited with {self.popen.returncode}:\n{log[-3000:]}")


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(scrape_port: int) -> Prometheus:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "static_configs": [{"targets": [f"127.0.0.1:{scrape_port}"]}],
                }
            ],
        }
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        (port,) = free_ports(1)
        log = tmp_path / "prometheus.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [
                    binary("prometheus"),
                    f"--config.file={path}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )
        procs.append(popen)
        return Prometheus(popen, port, log)

    try:
        yield start
    finally:
        for popen in procs:
            if popen.poll() is None:
                popen.kill()
            popen.wait(timeout=10)


async def api(session: aiohttp.ClientSession, prom: Prometheus, path: str, **params: str) -> Any:
    prom.check_alive()
    async with session.get(prom.url(path), params=params) as resp:
        body = await resp.json()
        assert resp.status == 200 and body["status"] == "success", (path, params, body)
        return body["data"]


async def wait_for(
    what: str, timeout: float, probe: Callable[[], Awaitable[bool]], detail: object = ""
) -> None:
    """Poll ``probe`` until true; fail after ``timeout`` with ``detail`` (or its str())."""
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s {detail}", pytrace=False)
        await asyncio.sleep(0.5)


async def call(
    session: aiohttp.ClientSession,
    gw: GatewayHandle,
    path: str,
    token: str | None,
    statuses: Counter[int],
) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with session.get(gw.url(path), headers=headers) as resp:
        await resp.read()
        statuses[resp.status] += 1
        return resp.status


async def drive_load(gw: GatewayHandle, sim: SimHandle) -> Counter[int]:
    """Every condition a panel shows: 401s, 403s, an upstream reset (502), an upstream 429
    and the freeze it causes, token-quota refusals, then saturating load on the default
    credential (queue waits, budget refusals)."""
    statuses: Counter[int] = Counter()
    busy = [await gw.token("contacts:read", name=f"svc{i}") for i in range(2)]
    capped = await gw.token("contacts:read", name="capped", per_minute=2)
    tags_only = await gw.token("tags:read", name="tagger")
    acme = await gw.token("contacts:read", name="acme-sync", upstream_key="acme")
    contacts = "/api/v1/contacts"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        await call(session, gw, contacts, None, statuses)  # 401 missing
        await call(session, gw, contacts, "egw_not_a_real_token", statuses)  # 401
        await call(session, gw, contacts, tags_only, statuses)  # 403 missing scope
        await call(session, gw, "/api/v1/tags", tags_only, statuses)
        await call(session, gw, "/api/v1/tags", tags_only, statuses)  # a cache hit
        sim.sim.set_faults(Faults(reset=True, count=1))
        assert await call(session, gw, contacts, busy[0], statuses) == 502
        sim.sim.set_faults(Faults(force_429=True, retry_after=3, count=1))
        assert await call(session, gw, contacts, acme, statuses) == 429  # echowin's own
        sim.sim.clear_faults()
        assert await call(session, gw, contacts, acme, statuses) == 429  # upstream_frozen
        for _ in range(4):
            await call(session, gw, contacts, capped, statuses)  # 2 x 200, then token_quota

        until = time.monotonic() + LOAD_SECONDS

        async def hammer(token: str) -> None:
            while time.monotonic() < until:
                if await call(session, gw, contacts, token, statuses) == 429:
                    await asyncio.sleep(0.2)

        await asyncio.gather(*(hammer(busy[i % 2]) for i in range(8)))
    return statuses


@pytest.mark.service
async def test_prometheus_scrapes_the_gateway_and_every_panel_has_data(
    redis_prefix: str,
    make_gateway: MakeGateway,
    sim: SimHandle,
    start_prometheus: Callable[[int], Prometheus],
) -> None:
    gw = await make_gateway(
        state=REDIS_URL,
        redis={"key_prefix": redis_prefix},
        upstream={"limits": LIMITS, "window_guard_seconds": 0.1},
        queue={"max_wait_seconds": 2},
        # The cache's metrics exist: tags kept; contacts not shared (the load wants 429s).
        cache={"coalesce": False, "routes": {"/api/v1/tags": 60}},
        # Every token in one class, so that the classes' row has data too.
        classes={"standard": {}},
        default_class="standard",
    )
    admin_port = gw.admin.port
    assert admin_port is not None
    prom = start_prometheus(admin_port)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

        async def target_up() -> bool:
            try:
                data = await api(session, prom, "/api/v1/targets")
            except aiohttp.ClientConnectionError:
                return False
            return any(t["health"] == "up" for t in data["activeTargets"])

        await wait_for("prometheus scraping the gateway", STARTUP_SECONDS, target_up)

        statuses = await drive_load(gw, sim)
        for status in (200, 401, 403, 429, 502):
            assert statuses[status] > 0, statuses
        assert sim.sim.statuses()[429] == 1, "only the forced upstream 429"

        # Every metric the dashboard and the rules name is on the live /metrics page; every
        # metric on that page is documented and charted.
        async with session.get(gw.admin_url("/metrics")) as resp:
            samples, families = exposed(await resp.text())
        assert families
        named = {
            name: where
            for where, expr in dashboard_queries() + rule_queries()
            for name in metric_names(expr)
        }
        named.update({metric: f"variable {var}" for var, metric, _ in variable_queries()})
        missing = {n: w for n, w in named.items() if n not in samples and n not in SYNTHETIC}
        assert not missing, f"named but not exposed: {missing}"
        documented = set(
            re.findall(r"`((?:echowin_gateway|process)_\w+)`", METRICS_DOC.read_text("utf-8"))
        )
        assert families - documented == set(), "undocumented metrics"
        assert documented - families == GROUP_ONLY, "documented but not exported"
        charted = {n.removesuffix("_bucket") for n in named}
        assert families - charted == set(), "metrics no panel shows"

        # Every panel query returns data from the real Prometheus.
        pending = {where: substitute(expr, LIVE_VARS) for where, expr in dashboard_queries()}
        assert len(pending) == len(dashboard_queries())

        async def all_have_data() -> bool:
            for where, expr in list(pending.items()):
                data = await api(session, prom, "/api/v1/query", query=expr)
                if data["result"]:
                    del pending[where]
            return not pending

        await wait_for("every panel query returns data", DATA_SECONDS, all_have_data, pending)
        for var, metric, label in variable_queries():
            values = await api(
                session, prom, f"/api/v1/label/{label}/values", **{"match[]": metric}
            )
            assert values, f"variable {var} has no values"

        # The rules evaluate cleanly against the live series: the upstream 429 above fires its
        # alert at once, the refusals start EchowinGatewayRefusalsRising's 10 minutes, and
        # nothing says the gateway or its Redis is down.
        states: dict[str, str] = {}

        async def rules_evaluated() -> bool:
            data = await api(session, prom, "/api/v1/rules")
            rules = [r for g in data["groups"] for r in g["rules"]]
            assert all(r["health"] != "err" for r in rules), rules
            states.update({r["name"]: r["state"] for r in rules})
            return (
                len(rules) == len(alert_rules())
                and all(r["health"] == "ok" for r in rules)
                and states["EchowinGatewayUpstream429"] == "firing"
                and states["EchowinGatewayRefusalsRising"] in {"pending", "firing"}
                and states["EchowinGatewayDown"] == "inactive"
                and states["EchowinGatewayStateBackendDown"] == "inactive"
            )

        await wait_for("alert rules evaluated as expected", 10.0, rules_evaluated, states)


# --- refusals the token store causes ---------------------------------------------------------


async def test_a_token_store_outage_is_counted_as_a_refusal(
    make_gateway: MakeGateway,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """A request whose token cannot be looked up (Redis down, the token not cached) gets 503
    ``state_unavailable`` at once: a refusal like any other in refusals_total, which the
    dashboard's refusal panels and the runbook's by-reason list read."""
    await wait_redis_up(redis_server.url)
    gw = await make_gateway(
        state=redis_server.url, on_state_failure="closed", redis={"timeout_seconds": 0.3}
    )
    token = await gw.token("contacts:read", name="never-seen")
    redis_server.stop()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        headers = {"Authorization": f"Bearer {token}"}
        async with session.get(gw.url("/api/v1/contacts"), headers=headers) as resp:
            assert resp.status == 503
            assert (await resp.json())["reason"] == "state_unavailable"
        async with session.get(gw.admin_url("/metrics")) as resp:
            text = await resp.text()
    refusals = {
        s.labels["reason"]: (s.labels["token"], s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "echowin_gateway_refusals_total"
    }
    assert refusals.get("state_unavailable") == ("-", 1.0), refusals
