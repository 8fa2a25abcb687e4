"""The request head as the lobby reads it (proxy/server/head.py): bytes in, a Head or None
(the request left to aiohttp) out."""

from __future__ import annotations

import pytest

from proxy.server.head import parse_head


def test_a_plain_head_is_read_with_its_size() -> None:
    data = (
        b"POST /api/v1/contacts?x=1 HTTP/1.1\r\nHost: h\r\nauthorization: Bearer t\r\n"
        b"Content-Length: 5\r\nX-Other: y\r\n\r\nhello"
    )
    head = parse_head(data)
    assert head is not None
    assert (head.method, head.target) == ("POST", "/api/v1/contacts?x=1")
    assert dict(head.fields) == {"authorization": "Bearer t", "Content-Length": "5"}
    assert head.fields["Authorization"] == "Bearer t"  # read as aiohttp does: any case
    assert head.size == len(data)


@pytest.mark.parametrize(
    "data",
    [
        b"GET /api/v1/contacts HTTP/1.1\r\nHost: h\r\n",  # not all of it yet
        b"GET /api/v1/contacts HTTP/1.1\r\nX: a\r\n b\r\n\r\n",  # obs-fold
        b"GET /api/v1/contacts HTTP/1.1\r\nX : a\r\n\r\n",  # a space before the colon
        b"GET /api/v1/contacts HTTP/1.1\r\nAuthorization: a\r\nauthorization: b\r\n\r\n",
        b"GET /api/v1/contacts HTTP/1.1\nHost: h\n\n",  # bare LF
        b"GET /api/v1/contacts HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        b"GET /api/v1/contacts HTTP/1.1\r\nX-API-Key: \xc3\xa9\r\n\r\n",
        b"GET http://h/api/v1/contacts HTTP/1.1\r\n\r\n",  # absolute form
        b"GET /api/v1/contacts HTTP/2.0\r\n\r\n",
        b"get /api/v1/contacts HTTP/1.1\r\n\r\n",
        b"GET /api/v1/contacts HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
    ],
)
def test_a_head_that_is_not_plain_is_left_to_aiohttp(data: bytes) -> None:
    assert parse_head(data) is None


def test_a_chunked_request_has_no_known_size() -> None:
    head = parse_head(b"POST /api/v1/contacts HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert head is not None and head.size is None
