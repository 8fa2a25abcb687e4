"""A request head as the lobby reads it, from the first bytes of a connection. Pure: bytes
in, a :class:`Head` or None out.

The lobby only chooses where a request waits: whatever it reads is read again by aiohttp
and decided again by the request handler. A head that is not plain (split across reads,
a field it reads given twice, a byte aiohttp might refuse) is None: the request goes to
aiohttp at once.
"""

from __future__ import annotations

import re

from multidict import CIMultiDict

HEAD_BYTES = 8 * 1024
"""A longer head goes to aiohttp at once (whose own limit on the request line is 8190)."""

# The fields a decision reads; the others stay in the bytes for aiohttp.
_READ = frozenset(
    {
        b"authorization",
        b"x-api-key",
        b"x-agency-key",
        b"x-gateway-max-wait",
        b"expect",
        b"content-length",
        b"transfer-encoding",
        b"x-forwarded-for",  # the client behind a trusted proxy (the auth throttle)
    }
)
_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) (/[\x21-\x7e]*) HTTP/1\.[01]")
_FIELD_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Control bytes other than tab, and CR or LF outside a CRLF.
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")


class Head:
    """A request head as the lobby reads it: method, target, the fields it decides on, and
    its body's length and the request's size on the wire (head and body), when the length
    is known (a Content-Length of at most 18 digits, or none, and no Transfer-Encoding).
    ``peer``: the connection's peer address as aiohttp's ``request.remote`` reads it, set
    by the lobby that read the head."""

    __slots__ = ("fields", "length", "method", "peer", "size", "target")

    def __init__(self, method: str, target: str, fields: CIMultiDict[str], head_size: int) -> None:
        self.method = method
        self.target = target
        self.fields = fields
        length = fields.get("Content-Length", "0")
        known = length.isdigit() and len(length) <= 18 and "Transfer-Encoding" not in fields
        self.length = int(length) if known else None
        self.size = None if self.length is None else head_size + self.length
        self.peer: str | None = None


def parse_head(data: bytes) -> Head | None:
    """The head at the start of ``data``, if ``data`` holds all of it and it is plain;
    None leaves the request to aiohttp."""
    end = data.find(b"\r\n\r\n", 0, HEAD_BYTES)
    if end < 0 or _CONTROL.search(data, 0, end + 4) is not None:
        return None
    lines = data[:end].split(b"\r\n")
    line = _REQUEST_LINE.fullmatch(lines[0])
    if line is None:
        return None
    fields: CIMultiDict[str] = CIMultiDict()
    for raw in lines[1:]:
        name, colon, value = raw.partition(b":")
        if not colon or _FIELD_NAME.fullmatch(name) is None:
            return None  # obs-fold, a space before the colon, no name
        if name.lower() in _READ:
            key = name.decode("ascii")
            if key in fields or not value.isascii():
                return None
            fields[key] = value.strip(b" \t").decode("ascii")
    return Head(line[1].decode("ascii"), line[2].decode("ascii"), fields, end + 4)


__all__ = ["HEAD_BYTES", "Head", "parse_head"]
