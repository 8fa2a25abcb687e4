"""The benchmark harness works (not how fast anything is): its quick mode runs end to end and
reports every scenario; its fallback load generator and its profile reader work.

Speed is never asserted here: the numbers depend on the machine and on what else runs on it.
docs/performance.md holds the numbers of one full run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from tests.bench import harness, loadgen, scale_profile, upstream

REPO = Path(__file__).resolve().parents[1]
QUEUED = 200
ServerFactory = Callable[..., Awaitable[TestServer]]
THROUGHPUT = ("admitted", "latency", "refusal", "unauthorized", "cache_hit", "cache_missing")
MEASURED_KEYS = {"rps", "p50_ms", "p90_ms", "p99_ms", "rounds", "rps_ratio", "p50_added_ms"}


def test_quick_mode_reports_every_scenario(tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    cmd = [sys.executable, "-m", "tests.bench.harness", "--quick", "--queued", str(QUEUED)]
    cmd += ["--tracing"]
    cmd += ["--json", str(out_json), "--markdown", str(out_md)]
    run = subprocess.run(
        cmd,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout)
    assert json.loads(out_json.read_text(encoding="utf-8")) == result

    assert set(result["scenarios"]) == {*harness.SCENARIOS, "workers"}
    workers = result["scenarios"]["workers"]
    assert set(workers["targets"]) == {"gateway-1w", "gateway-2w"}
    for entry in workers["targets"].values():
        assert entry["all_as_expected"], entry["rounds"]
        assert entry["rounds"][0]["requests"] > 0 and entry["cores"]["median"] is not None
    assert workers["ratio"] is not None
    assert workers["per_cpu_ratio"] is not None
    names = [t["name"] for t in result["targets"]]
    assert "req/s per gateway CPU-second, 2 workers vs 1" in names
    for name in THROUGHPUT:
        scenario = result["scenarios"][name]
        assert scenario["connections"] == (1 if name == "latency" else 50)
        assert {"gateway", "passthrough"} <= set(scenario["targets"]), name
        for target, entry in scenario["targets"].items():
            assert set(entry) >= MEASURED_KEYS, (name, target)
            assert len(entry["rounds"]) == 1
            # Every answer had the scenario's status (200, or 429/401 from the gateway).
            assert entry["all_as_expected"], (name, target, entry["rounds"])
            assert entry["rounds"][0]["requests"] > 0
    for name in harness.TRACED_SCENARIOS:  # --tracing: the traced gateways beside
        assert {"gateway+trace100", "gateway+trace1"} <= set(result["scenarios"][name]["targets"])
    # What the traced gateways exported reached the sink: three spans per recorded request.
    sink = result["meta"]["otlp_sink"]
    assert sink["exports"] > 0 and sink["spans"] >= 3
    want = {"refusal": 429, "unauthorized": 401}
    for name, status in want.items():
        assert result["scenarios"][name]["probes"]["gateway"] == status

    queued = result["scenarios"]["queued"]
    assert queued["requests"] == QUEUED
    for target in ("gateway", "passthrough"):
        entry = queued["targets"][target]
        assert entry["answered"] == QUEUED, entry
        assert entry["errors"] == 0, entry
        assert entry["rss_peak_mb"] > 0
    # The gateway really held them in its queue (its budget lets a quarter through per window).
    assert queued["targets"]["gateway"]["queued"] > 0

    names = [t["name"] for t in result["targets"]]
    assert len(names) == 7
    assert "cache hit req/s vs pass-through" in names
    assert all(isinstance(t["met"], bool) for t in result["targets"])
    table = out_md.read_text(encoding="utf-8")
    assert "| Scenario | Server |" in table
    assert "| Target | Wanted | Measured | Met |" in table
    assert "| gateway-2w |" in table
    assert "| admitted | gateway+trace100 vs gateway |" in table


async def test_python_load_generator_and_burst(aiohttp_server: ServerFactory) -> None:
    server = await aiohttp_server(upstream.build_app())
    url = str(server.make_url("/api/v1/contacts"))
    res = await loadgen.run_python(url, {"Authorization": "Bearer x"}, connections=2, seconds=0.3)
    assert res["requests"] > 0
    assert res["statuses"] == {"200": res["requests"]}
    assert res["errors"] == 0
    assert res["p50_ms"] is not None and res["p99_ms"] >= res["p50_ms"]

    burst = await loadgen.burst(url, {}, count=50, timeout=20)
    assert burst["answered"] == 50 and burst["errors"] == 0


def test_parse_response_lengths_and_chunks() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
    assert loadgen.parse_response(head + b"o") is None
    assert loadgen.parse_response(head + b"okHTTP/1.1") == (200, len(head) + 2, False)
    chunked = b"HTTP/1.1 429 X\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    body = b"3\r\nabc\r\n0\r\n\r\n"
    assert loadgen.parse_response(chunked + body[:-2]) is None
    assert loadgen.parse_response(chunked + body) == (429, len(chunked + body), True)


def test_scale_profile_compares_the_two_gateways_of_a_pair(tmp_path: Path) -> None:
    # tests/bench/scale_profile.py (run by hand: it needs py-spy): its arithmetic.
    handler = f"{REPO}/proxy/gateway/handler.py"
    one, scale = tmp_path / "one.txt", tmp_path / "scale.txt"
    one.write_text(f"main (m.py:1);handle ({handler}:9) 3\nmain (m.py:1) 1\n", encoding="utf-8")
    scale.write_text(
        f"main (m.py:1);handle ({handler}:9) 6\nmain (m.py:1) 2\n"
        "Thread._bootstrap (threading.py:1);work (w.py:2) 5\n",  # another thread: left out
        encoding="utf-8",
    )
    sums: dict[str, Any] = {}
    got = {}
    for tag, path, cpu_us in (("one", one, 100.0), ("scale", scale, 150.0)):
        total, functions = scale_profile.inclusive(path)
        got[tag] = {"requests": 10, "cpu_us": cpu_us, "samples": total, "functions": functions}
    assert got["scale"]["samples"] == 8
    scale_profile.add(sums, got)
    report = scale_profile.report(sums, 5)
    assert report["totals"]["scale"]["cpu_us_per_answer"] == 150.0
    grew = report["grew_most"][0]  # main: all of each gateway's CPU per answer
    assert (grew["function"], grew["one_us"], grew["scale_us"]) == ("main (m.py)", 100.0, 150.0)
    handle = next(r for r in report["grew_most"] if r["function"].startswith("handle"))
    assert (handle["one_us"], handle["scale_us"]) == (75.0, 112.5)  # 3/4 and 6/8 of each


def test_hotspots_reads_collapsed_stacks(tmp_path: Path) -> None:
    raw = tmp_path / "stacks.txt"
    site = "/x/.venv/lib/python3.11/site-packages"
    handler = f"{REPO}/proxy/gateway/handler.py"
    raw.write_text(
        f"main ({REPO}/proxy/cli/main.py:1);handle ({handler}:9);send ({site}/aiohttp/c.py:5) 3\n"
        f"main ({REPO}/proxy/cli/main.py:1);handle ({handler}:12) 1\n",
        encoding="utf-8",
    )
    found = harness.hotspots(raw)
    assert found["samples"] == 4
    assert found["self"][0] == {"function": "send (aiohttp/c.py)", "samples": 3, "share": 0.75}
    assert found["by_package"] == [
        {"package": "aiohttp", "samples": 3, "share": 0.75},
        {"package": "proxy/gateway/handler.py", "samples": 1, "share": 0.25},
    ]
    inclusive = {r["function"]: r["share"] for r in found["inclusive_gateway"]}
    assert inclusive == {"main (proxy/cli/main.py)": 1.0, "handle (proxy/gateway/handler.py)": 1.0}


async def test_upstream_answers_like_echowin(aiohttp_server: ServerFactory) -> None:
    """200 JSON with echowin's rate-limit headers: without them a memory:// gateway never
    calibrates and sends one request at a time."""
    server = await aiohttp_server(upstream.build_app())
    async with (
        aiohttp.ClientSession() as session,
        session.get(str(server.make_url("/api/v1/contacts"))) as resp,
    ):
        assert resp.status == 200
        assert await resp.json() == json.loads(upstream.BODY)
        for name, value in upstream.RATE_LIMIT_HEADERS.items():
            assert resp.headers[name] == value


def test_variants_have_their_own_floor_and_are_paired_with_their_main_server() -> None:
    """--loop twice and --baseline: gateway+uvloop is compared with passthrough+uvloop, and
    each variant with its main server round by round."""

    def runs(*rps: float) -> list[dict[str, object]]:
        return [
            {"rps": r, "p50_ms": 1000 / r, "p90_ms": 1.0, "p99_ms": 1.0, "as_expected": True}
            for r in rps
        ]

    rounds = {
        "gateway": runs(400, 500),
        "passthrough": runs(1000, 1000),
        "gateway+uvloop": runs(600, 600),
        "passthrough+uvloop": runs(1200, 1200),
        "gateway@base": runs(200, 250),
    }
    targets = harness.summarise("admitted", 50, rounds, {})["targets"]
    assert targets["gateway"]["rps_ratio"] == 0.45
    assert targets["gateway+uvloop"]["rps_ratio"] == 0.5  # over passthrough+uvloop
    assert targets["gateway@base"]["rps_ratio"] == 0.225  # over the main passthrough
    assert "vs_main" not in targets["gateway"]
    assert targets["gateway+uvloop"]["vs_main"]["rps_ratio_paired"]["median"] == 1.35
    assert targets["passthrough+uvloop"]["vs_main"]["rps_ratio_paired"]["median"] == 1.2
    assert targets["gateway@base"]["vs_main"]["rps_ratio_paired"]["median"] == 0.5

    checked = harness.check_targets({"admitted": {"targets": targets}}, ["gateway", "gateway@base"])
    assert [t["name"] for t in checked] == [
        "admitted req/s vs pass-through",
        "admitted req/s vs pass-through (gateway@base)",
    ]
    table = "\n".join(harness._loops_markdown({"admitted": {"targets": targets}}))
    assert "| admitted | gateway+uvloop vs gateway | 1.350 [1.200, 1.500] |" in table
    assert "| admitted | gateway@base vs gateway | 0.500 [0.500, 0.500] |" in table


def test_memory_floor_holds_every_request_then_answers(tmp_path: Path) -> None:
    # tests/bench/memory_floor.py: both floor servers hold N requests, report their RSS
    # with all N in, then answer every one (the numbers themselves are not checked).
    out = tmp_path / "floor.json"
    cmd = [sys.executable, "-m", "tests.bench.memory_floor", "--requests", "50"]
    cmd += ["--json", str(out)]
    run = subprocess.run(
        cmd, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-4000:]
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert [r["server"] for r in rows] == ["aiohttp", "protocol"]
    for row in rows:
        assert (row["answered"], row["errors"], row["event_loop"]) == (50, 0, "asyncio")
        assert 0 < row["rss_start_mb"] <= row["rss_held_mb"]


def test_scale_quick_mode_produces_every_figure(tmp_path: Path) -> None:
    # tests/bench/scale.py: keys from a keys file, tokens through the admin API, traffic
    # rotating over them; every figure is produced (none is judged).
    out_json, out_md = tmp_path / "scale.json", tmp_path / "scale.md"
    cmd = [sys.executable, "-m", "tests.bench.scale", "--quick", "--json", str(out_json)]
    cmd += ["--markdown", str(out_md)]
    run = subprocess.run(
        cmd, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(out_json.read_text(encoding="utf-8"))
    assert set(result["targets"]) == {"one", "scale-1", "scale-1key", "scale"}
    for name, entry in result["targets"].items():
        assert entry["all_as_expected"], (name, entry["rounds"])
        assert entry["rps"] > 0 and entry["cpu_us"] is not None and entry["rss_peak_mb"] > 0
    assert result["targets"]["one"]["rps_ratio"] == 1.0
    setup = result["setup"]
    assert setup["scale"]["tokens"] == result["meta"]["tokens"] > 1
    assert setup["scale"]["startup_seconds"] > 0 and setup["scale"]["rss_with_tokens_mb"] > 0
    scrapes = result["scrapes"]["scale"]
    assert scrapes["/metrics"]["series"] > 0 and scrapes["/status.json"]["bytes"] > 0
    # Traffic over 100 tokens: every one of them, or "other", is a label value.
    assert 1 < scrapes["/metrics"]["token_values"] <= 102
    assert "| scale |" in out_md.read_text(encoding="utf-8")


def test_scale_calls_counts_every_run(tmp_path: Path) -> None:
    # tests/bench/scale_calls.py: the gateway under cProfile, calls per request for each
    # run and what grows from one token to the spread (none is judged).
    out_json = tmp_path / "calls.json"
    cmd = [sys.executable, "-m", "tests.bench.scale_calls", "--keys", "4", "--tokens", "20"]
    cmd += ["--spread", "8", "--requests", "40", "--top", "5", "--json", str(out_json)]
    run = subprocess.run(
        cmd, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(out_json.read_text(encoding="utf-8"))
    runs = {"one", "1key", "spread"}
    for figure in ("calls_per_request", "rps", "write_ahead_transactions", "token_store_reads"):
        assert set(result[figure]) == runs, figure
    assert all(calls > 50 for calls in result["calls_per_request"].values())
    assert len(result["grown_spread"]) == len(result["grown_1key"]) == 5


def test_replicas_quick_mode_produces_every_figure(tmp_path: Path) -> None:
    # tests/bench/replicas.py: a private redis-server and a private three-master cluster,
    # 1 to 3 replicas on the first, 1 and 2 on the cluster, and one gateway on SQLite;
    # req/s per replica and Redis round trips per answer are produced for each.
    out_json, out_md = tmp_path / "replicas.json", tmp_path / "replicas.md"
    cmd = [sys.executable, "-m", "tests.bench.replicas", "--quick", "--json", str(out_json)]
    cmd += ["--markdown", str(out_md)]
    run = subprocess.run(
        cmd, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(out_json.read_text(encoding="utf-8"))
    redis_setups = {"redis-1", "redis-2", "redis-3", "cluster-1", "cluster-2"}
    assert set(result["targets"]) == {"sqlite", *redis_setups}
    for name, entry in result["targets"].items():
        assert entry["all_as_expected"], (name, entry["rounds"])
        assert entry["rps"] > 0 and entry["rps_per_replica"] > 0
        assert len(entry["rounds"][0]["rps_per_replica"]) == entry["replicas"]
    sqlite = result["targets"]["sqlite"]
    assert sqlite["redis_ops_per_request"] == 0 == sqlite["redis_commands_per_request"]
    for name in redis_setups:
        entry = result["targets"][name]
        # Each admitted request reaches Redis (the gateway's count and Redis's own).
        assert entry["redis_ops_per_request"] > 0, name
        assert entry["redis_commands_per_request"] > 0, name
        nodes = 3 if name.startswith("cluster") else 1
        assert len(entry["rounds"][0]["redis_commands_by_node"]) == nodes, name
    assert result["targets"]["cluster-2"]["replicas"] == 2
    assert "| cluster-2 | 2 |" in out_md.read_text(encoding="utf-8")


def test_outage_bench_quick_mode_runs() -> None:
    """tests/bench/outage.py --quick: both scenarios run and report their counts; never an
    upstream 429 (a correctness property, not a speed)."""
    run = subprocess.run(
        [sys.executable, "-m", "tests.bench.outage", "--quick"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout)
    scenarios = [r["scenario"] for r in result["rounds"]]
    assert scenarios == ["loaded", "old_view", "light", "light+window"]
    for entry in result["rounds"]:
        assert entry["upstream_429s"] == 0, entry
        assert entry["ideal_sends"] > 0 and len(entry["admitted_per_replica"]) == 2
    assert "first_admit_seconds" in result["rounds"][1]
    for entry in result["rounds"][2:]:
        assert entry["calls_during_outage"] >= entry["answered_200"] > 0, entry


def test_token_create_quick_mode_measures_every_backend() -> None:
    # tests/bench/token_create.py: a store filled with tokens, then creates through
    # create_token on memory, SQLite and a private Redis; the figures are not judged.
    cmd = [sys.executable, "-m", "tests.bench.token_create", "--quick"]
    run = subprocess.run(
        cmd, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout)
    assert set(result) == {"memory", "sqlite", "redis"}
    for backend, entry in result.items():
        assert (entry["tokens_before"], entry["creates"]) == (200, 20), backend
        assert 0 < entry["create_ms_median"] <= entry["create_ms_p90"], backend
