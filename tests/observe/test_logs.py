"""The access log: the same lines the logging formatters make, written in whole-line batches,
and nothing lost on a clean shutdown (SIGTERM) or across a reload (SIGHUP)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import LoggingConfig
from proxy.observe.logs import (
    ACCESS_LOGGER,
    USER_AGENT_MAX,
    AccessLog,
    JsonFormatter,
    TextFormatter,
)
from tests.procs import (
    Spawn,
    create_token,
    eventually,
    gateway_config,
    http_client,
    start_gateway,
    start_sim,
    write_config,
)

FIELDS = (
    "request_id",
    "token_id",
    "token_name",
    "method",
    "route",
    "credential",
    "status",
    "upstream_status",
    "queue_ms",
    "upstream_ms",
    "total_ms",
    "bytes",
    "refusal",
    "client_address",
    "user_agent",
)
SAMPLE: tuple[Any, ...] = (
    "r-1", "abcdefabcdef", "crm", "GET", "/api/v1/contacts", "default",
    200, 200, 0.0, 0.00125, 0.0025, 320, None,
)  # fmt: skip


class Recorder(io.StringIO):
    """A stream that remembers each write and counts flushes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.flushes = 0
        self.flushed = asyncio.Event()

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1
        self.flushed.set()


def formatted(fmt: logging.Formatter, values: tuple[Any, ...], created: float) -> str:
    """What ``logging.getLogger(ACCESS_LOGGER).info("request", extra=...)`` would print, the
    times in milliseconds with three decimals, the user agent cut to 200 characters (and
    in the text format quoted and escaped as a JSON string)."""
    fields = dict(zip(FIELDS, values + (None,) * (len(FIELDS) - len(values)), strict=True))
    for name in ("queue_ms", "upstream_ms", "total_ms"):
        fields[name] = Decimal3(round(fields[name] * 1000, 3))
    if fields["user_agent"] is not None:
        fields["user_agent"] = fields["user_agent"][:USER_AGENT_MAX]
        if isinstance(fmt, TextFormatter):
            fields["user_agent"] = json.dumps(fields["user_agent"])
    record = logging.getLogger(ACCESS_LOGGER).makeRecord(
        ACCESS_LOGGER, logging.INFO, __file__, 1, "request", (), None, extra={"fields": fields}
    )
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    return fmt.format(record) + "\n"


class Decimal3(float):
    """A float that str() shows with three decimals (json.dumps ignores this)."""

    def __str__(self) -> str:
        return f"{self:.3f}"


def made(fmt: str, values: tuple[Any, ...]) -> str:
    log = AccessLog(Recorder())
    log.configure(LoggingConfig(format=fmt))  # type: ignore[arg-type]
    log.request(*values[:13], None, *values[13:])  # no cache field
    log.flush()
    assert isinstance(log.stream, Recorder)
    return log.stream.getvalue()


text_values = st.text(max_size=40)
seconds = st.floats(min_value=0, max_value=1e4, allow_nan=False)
values = st.tuples(
    text_values, st.none() | text_values, text_values, text_values, text_values,
    st.none() | text_values, st.integers(100, 599), st.none() | st.integers(100, 599),
    seconds, seconds, seconds, st.integers(0, 10**12), st.none() | text_values,
    st.none() | st.ip_addresses().map(str), st.none() | st.text(max_size=300),
)  # fmt: skip


@given(values)
def test_a_json_line_is_the_json_formatters_line(fields: tuple[Any, ...]) -> None:
    line = made("json", fields)
    assert line.endswith("}\n") and line.count("\n") == 1
    got = json.loads(line)
    want = json.loads(formatted(JsonFormatter(), fields, 1_700_000_000.0))
    assert list(got) == list(want)  # the same keys in the same order
    del got["time"], want["time"]
    assert got == want  # the same values; milliseconds as the formatter's round(x, 3)
    for name in ("queue_ms", "upstream_ms", "total_ms"):
        assert re.search(rf'"{name}":\d+\.\d{{3}},', line), name


@given(values.filter(lambda v: all("\n" not in str(x) for x in v)))
def test_a_text_line_is_the_text_formatters_line(fields: tuple[Any, ...]) -> None:
    line = made("text", fields)
    want = formatted(TextFormatter(), fields, 1_700_000_000.0)
    assert line.split(" ", 1)[1] == want.split(" ", 1)[1]  # all but the time stamp
    assert len(line.split(" ", 1)[0]) == len("2023-11-14T22:13:20")


def test_the_time_is_utc_with_milliseconds() -> None:
    line = json.loads(made("json", SAMPLE))
    assert len(line["time"]) == len("2023-11-14T22:13:20.123Z") and line["time"].endswith("Z")


@pytest.mark.parametrize(
    ("settings", "on"),
    [
        ({}, True),
        ({"level": "debug"}, True),
        ({"level": "warning"}, False),
        ({"level": "error"}, False),
        ({"access_log": False}, False),
    ],
)
def test_settings_turn_it_on_and_off(settings: dict[str, Any], on: bool) -> None:
    log = AccessLog(Recorder())
    log.configure(LoggingConfig(**settings))
    assert log.enabled is on


async def test_lines_wait_for_the_timer_then_go_in_one_write() -> None:
    stream = Recorder()
    log = AccessLog(stream)
    for n in range(3):
        log.request(f"r-{n}", *SAMPLE[1:])
    assert stream.writes == []  # nothing yet: the lines wait for the batch
    await asyncio.wait_for(stream.flushed.wait(), timeout=10)
    assert len(stream.writes) == 1 and stream.flushes == 1
    assert [json.loads(line)["request_id"] for line in stream.writes[0].splitlines()] == [
        "r-0",
        "r-1",
        "r-2",
    ]


async def test_a_full_buffer_is_written_at_once() -> None:
    stream = Recorder()
    log = AccessLog(stream)
    for n in range(log.BUFFER_LINES):
        log.request(f"r-{n}", *SAMPLE[1:])
    lines = stream.getvalue().splitlines()
    assert len(lines) == log.BUFFER_LINES  # written without waiting for the timer
    assert [json.loads(line)["request_id"] for line in lines[:2]] == ["r-0", "r-1"]


def test_each_write_holds_whole_lines_within_pipe_buf() -> None:
    stream = Recorder()
    log = AccessLog(stream)
    for n in range(300):
        log.request(f"r-{n}-" + "x" * (n % 97), *SAMPLE[1:])
    log.flush()
    assert len(stream.writes) > 1
    for chunk in stream.writes:
        assert len(chunk.encode()) <= 4096 and chunk.endswith("\n")
    ids = [json.loads(line)["request_id"] for line in stream.getvalue().splitlines()]
    assert ids == [f"r-{n}-" + "x" * (n % 97) for n in range(300)]


def test_without_an_event_loop_lines_go_out_at_once() -> None:
    stream = Recorder()
    AccessLog(stream).request(*SAMPLE)
    assert json.loads(stream.getvalue())["request_id"] == "r-1"


async def test_close_writes_what_waits_and_then_every_line_at_once() -> None:
    stream = Recorder()
    log = AccessLog(stream)
    log.request(*SAMPLE)
    log.close()
    assert len(stream.getvalue().splitlines()) == 1
    log.request("late", *SAMPLE[1:])  # e.g. a queued request cancelled during shutdown
    assert json.loads(stream.getvalue().splitlines()[-1])["request_id"] == "late"


async def test_a_broken_stream_costs_lines_not_requests() -> None:
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError

    log = AccessLog(Broken())
    log.request(*SAMPLE)
    log.flush()  # no exception
    log.request(*SAMPLE)


async def test_a_reload_and_a_sigterm_lose_no_access_line(tmp_path: Path, spawn: Spawn) -> None:
    sim = await start_sim(spawn)
    gw = gateway_config(tmp_path, sim.url)
    token = create_token(gw, "--name", "svc", "--scope", "contacts:read")
    headers = {"X-API-Key": token}
    async with http_client() as session:
        gateway = await start_gateway(spawn, session, gw)
        for n in range(5):
            headers["X-Request-ID"] = f"json-{n}"
            async with session.get(gw.url("/api/v1/contacts"), headers=headers) as resp:
                assert resp.status == 200
        raw = yaml.safe_load(gw.config.read_text())
        raw["logging"] = {"format": "text"}
        write_config(gw.config, raw)
        gateway.popen.send_signal(signal.SIGHUP)

        # The reload shows in its own (unbuffered) log line, which follows the batch flush.
        async def reloaded() -> bool:
            gateway.check_alive()
            return "config reloaded" in gateway.stderr()

        await eventually(reloaded, "the reload", 10)
        for n in range(3):
            headers["X-Request-ID"] = f"text-{n}"
            async with session.get(gw.url("/api/v1/contacts"), headers=headers) as resp:
                assert resp.status == 200
        gateway.popen.send_signal(signal.SIGTERM)
        assert await gateway.wait_exit(timeout=10) == 0
    lines = gateway.stderr().splitlines()
    json_ids = [
        json.loads(line)["request_id"]
        for line in lines
        if line.startswith("{") and '"logger":"echowin_gateway.access"' in line
    ]
    assert json_ids == [f"json-{n}" for n in range(5)]
    text_lines = [line for line in lines if " info echowin_gateway.access: request " in line]
    assert [line.split("request_id=")[1].split(" ")[0] for line in text_lines] == [
        f"text-{n}" for n in range(3)
    ]
    assert all("status=200" in line and "route=/api/v1/contacts" in line for line in text_lines)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_hostile_user_agent_stays_on_its_line_and_within_bounds(fmt: str) -> None:
    agent = 'evil"\n{"status":200} \\ \x1b[31m ünï ' + "x" * 1000
    line = made(fmt, (*SAMPLE, "192.0.2.7", agent))
    assert line.count("\n") == 1 and line.endswith("\n")
    assert line.isascii() and "\x1b" not in line
    if fmt == "json":
        got = json.loads(line)
        assert got["user_agent"] == agent[:USER_AGENT_MAX]
        assert got["client_address"] == "192.0.2.7"
    else:
        shown = re.search(r' user_agent=("(?:[^"\\]|\\.)*")(?: |\n)', line)
        assert shown is not None, line
        assert json.loads(shown[1]) == agent[:USER_AGENT_MAX]
        assert " client_address=192.0.2.7 " in line


def test_the_text_format_prints_a_dash_for_what_is_not_known() -> None:
    anonymous = ("r-1", None, "anonymous", "GET", "unmatched", None, 401, None,
                 0.0, 0.0, 0.001, 0, "missing", None, None)  # fmt: skip
    line = made("text", anonymous)
    assert "None" not in line
    for field in ("token_id", "credential", "upstream_status", "client_address", "user_agent"):
        assert f" {field}=- " in line or line.endswith(f" {field}=-\n"), field


def test_trace_ids_follow_when_tracing_is_on() -> None:
    class Ids:
        trace_id = "0af7651916cd43dd8448eb211c80319c"
        span_id = "b7ad6b7169203331"

    for fmt in ("json", "text"):
        log = AccessLog(Recorder())
        log.configure(LoggingConfig(format=fmt))  # type: ignore[arg-type]
        log.request(*SAMPLE, "hit", "127.0.0.1", "curl/8", Ids())
        log.flush()
        assert isinstance(log.stream, Recorder)
        line = log.stream.getvalue()
        if fmt == "json":
            got = json.loads(line)
            assert (got["cache"], got["trace_id"], got["span_id"]) == (
                "hit",
                Ids.trace_id,
                Ids.span_id,
            )
        else:
            assert line.endswith(f" cache=hit trace_id={Ids.trace_id} span_id={Ids.span_id}\n")
    assert "trace_id" not in made("json", SAMPLE)  # tracing off: no field
