"""The header fields that end at each hop (RFC 9110 §7.6.1): the fixed list, and those a
message's ``Connection`` field names. Pure: header mappings in, names out."""

from __future__ import annotations

import functools

from multidict import MultiMapping

# RFC 9110 §7.6.1 connection-specific fields, plus the old Proxy-Connection and
# Keep-Alive that HTTP/1.0 peers still send.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def connection_tokens(headers: MultiMapping[str]) -> frozenset[str]:
    """The header names the ``Connection`` field marks as hop-by-hop, lower-cased.

    Every ``Connection`` line counts: a list-based field sent on several lines is one
    field (RFC 9110 §5.3), so a name on the second line is as hop-by-hop as on the first."""
    values = headers.getall("Connection", ())
    if not values:
        return _NO_TOKENS
    return _tokens(values[0] if len(values) == 1 else ",".join(values))


_NO_TOKENS: frozenset[str] = frozenset()


@functools.lru_cache(maxsize=64)
def _tokens(value: str) -> frozenset[str]:
    # The same few values ("keep-alive", "close") come with nearly every message.
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


__all__ = ["HOP_BY_HOP", "connection_tokens"]
