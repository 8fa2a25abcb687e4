"""The only door to the network: one keep-alive connection pool towards echowin
(pool.py), and the header fields that end at each hop (hop_by_hop.py).

Bodies stream both ways and are never decompressed or re-encoded (``auto_decompress``
is off), so echowin's bytes reach the caller as echowin sent them. Failures are
classified for the caller: :class:`UpstreamTimeout` (-> 504) and
:class:`UpstreamUnreachable` (-> 502, with ``sent`` telling whether a byte may have left).
Exception texts never carry request headers, so a real key cannot leak through them.
"""

from proxy.upstream.hop_by_hop import HOP_BY_HOP, connection_tokens
from proxy.upstream.pool import (
    IDLE_SECONDS,
    READ_BUFSIZE,
    Upstream,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)

__all__ = [
    "HOP_BY_HOP",
    "IDLE_SECONDS",
    "READ_BUFSIZE",
    "Upstream",
    "UpstreamError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "UpstreamUnreachable",
    "connection_tokens",
]
