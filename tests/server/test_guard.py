"""The pure parts of proxy/server/guard.py: the log budget of malformed requests (a clock passed in,
no sleeping), the connection counts, the client address a connection counts against, and
the refusal's bytes. No sockets; tests/test_hostile_server.py drives the real listeners."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from proxy.server.guard import (
    REFUSAL_REASONS,
    ConnectionBounds,
    LogBudget,
    MalformedLog,
    Slot,
    client_address,
    networks,
    refusal,
)

# --- LogBudget ---------------------------------------------------------------------------


def test_a_few_lines_per_interval_then_the_rest_are_counted() -> None:
    budget = LogBudget(lines=3, interval=10.0)
    assert [budget.take(100.0 + i * 0.1) for i in range(3)] == [(True, 0)] * 3
    assert [budget.take(101.0 + i) for i in range(5)] == [(False, 0)] * 5
    assert budget.suppressed == 5 and budget.ends == 110.0
    assert budget.due(109.9) == 0  # not over yet
    # The next line after the interval reports it first, and opens a new one.
    assert budget.take(110.0) == (True, 5)
    assert budget.suppressed == 0 and budget.ends == 120.0


def test_an_interval_that_ends_is_reported_once_and_a_quiet_one_not_at_all() -> None:
    budget = LogBudget(lines=1, interval=5.0)
    assert budget.take(0.0) == (True, 0)
    assert budget.take(1.0) == (False, 0)
    assert budget.take(2.0) == (False, 0)
    assert budget.due(5.0) == 2  # the timer's call at the interval's end
    assert budget.due(6.0) == 0  # told once
    assert budget.ends is None
    assert budget.take(100.0) == (True, 0)  # a quiet log writes an attack's first line at once
    assert budget.due(105.0) == 0  # nothing was suppressed: no summary


def test_lines_written_never_exceed_the_budget_whatever_the_rate() -> None:
    budget = LogBudget(lines=5, interval=60.0)
    written = reported = 0
    for i in range(30_000):  # 30,000 malformed requests over 300 s
        write, report = budget.take(i * 0.01)
        written += write
        reported += report
    reported += budget.due(1e9)
    assert written <= 5 * (300 // 60 + 1)
    assert written + reported == 30_000  # every one told, alone or in a summary


async def test_the_malformed_log_writes_a_summary_when_its_interval_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="echowin_gateway.guard")
    now = [0.0]
    quiet = MalformedLog(lines=2, interval=0.05, clock=lambda: now[0])
    for _ in range(7):
        quiet.note(400, ValueError("the caller's bytes: 10.0.0.1"))
    now[0] = 0.05  # the interval is over by the time its timer (0.05 s on the loop) fires

    def messages() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "echowin_gateway.guard"]

    deadline = asyncio.get_running_loop().time() + 5.0
    while len(messages()) < 3 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert messages() == ["malformed request"] * 2 + ["5 malformed requests suppressed"]
    for record in caplog.records:
        assert record.levelno == logging.INFO
        assert "10.0.0.1" not in json.dumps(record.fields)  # type: ignore[attr-defined]
    quiet.close()


# --- ConnectionBounds --------------------------------------------------------------------


def test_connections_are_counted_per_client_and_in_total() -> None:
    bounds = ConnectionBounds(max_total=4, max_per_client=2)
    a = [bounds.take(("10.0.0.1", 1000 + i)) for i in range(2)]
    assert all(isinstance(s, Slot) for s in a)
    assert bounds.take(("10.0.0.1", 1003)) == "too_many_connections_from_client"
    b = [bounds.take(("10.0.0.2", 1000 + i)) for i in range(2)]
    assert all(isinstance(s, Slot) for s in b)
    assert bounds.open == 4
    assert bounds.take(("10.0.0.3", 1)) == "too_many_connections"
    slot = a[0]
    assert isinstance(slot, Slot)
    slot.release()
    slot.release()  # once only
    assert bounds.open == 3 and bounds.from_client("10.0.0.1") == 1
    assert isinstance(bounds.take(("10.0.0.1", 1004)), Slot)
    for s in [*a[1:], *b]:
        assert isinstance(s, Slot)
        s.release()
    assert bounds.open == 1 and bounds.from_client("10.0.0.2") == 0


def test_trusted_proxies_and_unix_peers_count_only_in_the_total() -> None:
    bounds = ConnectionBounds(3, 1, networks(["10.1.0.0/16", "fd00::/8"]))
    held = [bounds.take(("10.1.2.3", 1)), bounds.take(("10.1.2.3", 2)), bounds.take("")]
    assert all(isinstance(s, Slot) for s in held)
    assert bounds.take(("fd00::1", 1, 0, 0)) == "too_many_connections"


@pytest.mark.parametrize(
    ("peer", "client"),
    [
        (("127.0.0.1", 5), "127.0.0.1"),
        (("::ffff:192.0.2.7", 5, 0, 0), "192.0.2.7"),  # IPv4 on a dual-stack listener
        (("2001:db8::1", 5, 0, 0), "2001:db8::1"),
        (("10.9.0.1", 5), None),  # a trusted proxy
        (("::ffff:10.9.0.1", 5, 0, 0), None),
        ("", None),  # a unix socket
        (None, None),
    ],
)
def test_the_client_a_connection_counts_against(peer: object, client: str | None) -> None:
    assert client_address(peer, networks(["10.9.0.0/24"])) == client


@pytest.mark.parametrize("reason", REFUSAL_REASONS)
def test_a_refusal_is_a_whole_503_json_answer_that_closes(reason: str) -> None:
    head, _, body = refusal(reason).partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    fields = dict(line.split(": ", 1) for line in lines[1:])
    assert fields["Connection"] == "close"
    assert fields["Content-Type"].startswith("application/json")
    assert int(fields["Content-Length"]) == len(body)
    assert json.loads(body) == {"error": "Too many connections", "reason": reason}
