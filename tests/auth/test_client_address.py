"""Who the client is (proxy/auth/client_address.py): the peer, or behind a trusted proxy the
rightmost X-Forwarded-For address that is not itself a trusted proxy. Pure: no sockets."""

from __future__ import annotations

import ipaddress

import pytest

from proxy.auth.client_address import TrustedProxies, client_address, parse_address

PROXIES = TrustedProxies.parse(["10.0.0.0/8", "192.0.2.7", "fd00::/8"])


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.9", "203.0.113.9"),
        (" 203.0.113.9 ", "203.0.113.9"),
        ("203.0.113.9:4711", "203.0.113.9"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:203.0.113.9", "203.0.113.9"),  # a dual-stack socket's IPv4 peer
        ("unknown", None),
        ("", None),
        (None, None),
        ("[2001:db8::1", None),
        ("203.0.113.9.1", None),
        ("_hidden", None),
    ],
)
def test_addresses_are_read_as_peers_and_proxies_write_them(
    text: str | None, expected: str | None
) -> None:
    address = parse_address(text)
    assert (None if address is None else str(address)) == expected


def test_an_untrusted_peer_is_the_client_whatever_it_forwards() -> None:
    assert client_address("203.0.113.9", ["198.51.100.1"], PROXIES) == ip("203.0.113.9")
    assert client_address("203.0.113.9", [], TrustedProxies()) == ip("203.0.113.9")
    # Nothing trusted: X-Forwarded-For is never read, even from a private address.
    assert client_address("10.1.2.3", ["198.51.100.1"], TrustedProxies()) == ip("10.1.2.3")


def test_behind_a_trusted_proxy_the_rightmost_untrusted_address_is_the_client() -> None:
    # The caller wrote 6.6.6.6 itself; the trusted proxy appended the address it saw.
    assert client_address("10.0.0.5", ["6.6.6.6, 198.51.100.1"], PROXIES) == ip("198.51.100.1")
    # Trusted hops (two of ours) are skipped, right to left.
    forwarded = ["6.6.6.6, 198.51.100.1, 10.9.9.9", "192.0.2.7"]
    assert client_address("10.0.0.5", forwarded, PROXIES) == ip("198.51.100.1")
    # IPv6 proxies and clients alike.
    assert client_address("fd00::1", ["2001:db8::42"], PROXIES) == ip("2001:db8::42")


def test_when_every_hop_is_trusted_the_leftmost_is_the_client() -> None:
    assert client_address("10.0.0.5", ["10.0.0.9, 10.0.0.8"], PROXIES) == ip("10.0.0.9")
    assert client_address("10.0.0.5", [], PROXIES) == ip("10.0.0.5")


def test_an_entry_that_is_no_address_ends_the_walk_at_the_hop_that_passed_it() -> None:
    forwarded = ["198.51.100.1, garbage, 10.0.0.9"]
    assert client_address("10.0.0.5", forwarded, PROXIES) == ip("10.0.0.9")
    assert client_address("10.0.0.5", ["198.51.100.1,,"], PROXIES) == ip("10.0.0.5")


def test_a_peer_that_is_no_address_has_no_client_address() -> None:
    assert client_address("/run/gw.sock", ["198.51.100.1"], PROXIES) is None
    assert client_address(None, [], PROXIES) is None


def test_proxies_parse_addresses_and_networks_with_host_bits() -> None:
    trusted = TrustedProxies.parse(["127.0.0.1", "10.1.2.3/8", "::1"])
    assert [str(n) for n in trusted.networks] == ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]
    assert trusted.trusts(ip("10.200.0.1"))
    assert not trusted.trusts(ip("11.0.0.1"))
    assert not trusted.trusts(ip("::ffff:10.0.0.1"))  # another family: no error, no trust
    assert not TrustedProxies()
