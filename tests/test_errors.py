"""JSON error bodies: byte for byte what json.dumps makes, without building a dict; and
JSON even for a request the HTTP parser refuses."""

from __future__ import annotations

import asyncio
import json
import re
from http import HTTPStatus
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import Reason, json_body, json_error
from tests.procs import Spawn, gateway_config, http_client, start_gateway

ROOT = Path(__file__).resolve().parent.parent
values = st.one_of(st.text(), st.integers(), st.floats(allow_nan=False), st.booleans(), st.none())


@given(
    st.text(),
    st.none() | st.text(),
    st.dictionaries(st.text().filter(lambda k: k not in ("error", "reason")), values, max_size=3),
)
def test_json_body_is_json_dumps(error: str, reason: str | None, extra: dict[str, object]) -> None:
    want: dict[str, object] = {"error": error}
    if reason is not None:
        want["reason"] = reason
    want.update(extra)
    assert json_body(error, reason, **extra) == json.dumps(want, separators=(",", ":")).encode()


def test_json_error_answers_json() -> None:
    response = json_error(429, "Slow down", reason=Reason.UPSTREAM_BUDGET, retryAfter=3)
    assert response.status == 429 and response.content_type == "application/json"
    assert response.body == b'{"error":"Slow down","reason":"upstream_budget","retryAfter":3}'


async def test_a_request_aiohttp_cannot_parse_gets_a_json_error(
    tmp_path: Path, spawn: Spawn
) -> None:
    """Answers the HTTP parser gives before any handler runs are JSON too (real ``serve``)."""
    gw = gateway_config(tmp_path, "http://127.0.0.1:9")
    async with http_client() as session:
        await start_gateway(spawn, session, gw)
    start = "GET /api/v1/contacts HTTP/1.1\r\nHost: x\r\n"
    for head, status in (
        (start + "X-Big: " + "a" * 20_000 + "\r\n\r\n", 431),  # over max_field_size
        ("GET /api/v1/contacts?q=" + "a" * 9000 + " HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (start + "Not a header line\r\n\r\n", 400),
        ("GET /api/v1/contacts HTTP/9.x\r\n\r\n", 400),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(head.encode())
            answer = await asyncio.wait_for(reader.read(), 5)  # and the connection closes
        finally:
            writer.close()
        line, _, rest = answer.partition(b"\r\n")
        fields, _, body = rest.partition(b"\r\n\r\n")
        assert line.split()[1] == str(status).encode(), answer[:200]
        assert b"content-type: application/json" in fields.lower()
        assert json.loads(body) == {"error": HTTPStatus(status).phrase, "reason": "bad_request"}


def _table_reasons(text: str, heading: str) -> list[str]:
    """The first column's names of the table under ``heading`` (up to the next heading)."""
    section = text.split(heading + "\n", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [re.findall(r"`([a-z0-9_]+)`", row.split("|")[1])[0] for row in rows]


def test_the_docs_list_every_refusal_reason_once() -> None:
    documented = _table_reasons(
        (ROOT / "docs" / "operations.md").read_text(encoding="utf-8"), "## Refusal reasons"
    )
    assert sorted(documented) == sorted(reason.value for reason in Reason)


def test_the_readme_names_only_refusal_reasons() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### What the gateway answers itself\n", 1)[1].split("\n#", 1)[0]
    named = {
        name
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| status")
        for name in re.findall(r"`([a-z0-9_]+)`", line.rsplit("|", 2)[1])
    }
    assert named and named <= {reason.value for reason in Reason}


def test_a_reason_is_its_string_in_bodies_logs_and_labels() -> None:
    """StrEnum: a member formats, hashes and encodes as its value, so a label or a log
    field given the member reads as the body's reason."""
    reason = Reason.MISSING_SCOPE
    assert reason == "missing_scope" and hash(reason) == hash("missing_scope")
    assert f"{reason}" == str(reason) == "missing_scope"
    assert json.dumps({"reason": reason}) == '{"reason": "missing_scope"}'
    assert json_body("x", reason) == json_body("x", "missing_scope")
