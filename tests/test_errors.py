"""JSON error bodies: byte for byte what json.dumps makes, without building a dict."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import json_body, json_error

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
    response = json_error(429, "Slow down", reason="upstream_budget", retryAfter=3)
    assert response.status == 429 and response.content_type == "application/json"
    assert response.body == b'{"error":"Slow down","reason":"upstream_budget","retryAfter":3}'
