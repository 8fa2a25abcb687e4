"""The header fields that end at each hop (proxy/upstream/hop_by_hop.py): pure, no loop."""

from __future__ import annotations

from multidict import CIMultiDict

from proxy.upstream.hop_by_hop import HOP_BY_HOP, connection_tokens


def test_the_connection_field_names_more_hop_by_hop_fields_lower_cased() -> None:
    headers = CIMultiDict({"Connection": "Keep-Alive, X-Trace ,, close"})
    assert connection_tokens(headers) == {"keep-alive", "x-trace", "close"}


def test_every_connection_line_counts() -> None:
    headers: CIMultiDict[str] = CIMultiDict()
    headers.add("Connection", "close")
    headers.add("connection", "X-Second")
    assert connection_tokens(headers) == {"close", "x-second"}


def test_no_connection_field_names_nothing() -> None:
    assert connection_tokens(CIMultiDict({"Host": "h"})) == frozenset()


def test_the_fixed_list_holds_the_rfc_fields() -> None:
    assert {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"} <= (
        HOP_BY_HOP
    )
