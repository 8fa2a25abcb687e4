"""Who the client is: the peer address, or, behind a trusted proxy, the address that proxy
says it serves (``server.trusted_proxies``, SPEC §5 "Hostile callers").

Pure: ``ipaddress`` only, no I/O, no clock.

The rule is the usual one (nginx's ``real_ip_recursive on``, Go's and Rails'
"rightmost untrusted"): a peer outside ``trusted_proxies`` is the client, whatever
``X-Forwarded-For`` it sends, since anyone can write that field. A trusted peer appended
the address it took the request from to the field's right end; reading the field from
the right, every trusted proxy is skipped, and the first address that is not one is the
client. Addresses left of it were written by someone the gateway does not trust and are
never read. An entry that is not an address ends the walk: the trusted hop that passed it
on is the client (an attacker cannot mint a new client by writing garbage). When every
address is trusted, the leftmost one is the client.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

__all__ = ["Address", "TrustedProxies", "client_address", "parse_address"]


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    """The proxies whose ``X-Forwarded-For`` is believed, parsed once."""

    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, cidrs: Iterable[str]) -> TrustedProxies:
        """From ``server.trusted_proxies`` (CIDRs or single addresses, validated by the
        config; host bits are allowed and ignored, as the config allows them)."""
        return cls(tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: Address) -> bool:
        # ``in`` is False across address families, never an error.
        return any(address in network for network in self.networks)


@functools.lru_cache(maxsize=1024)
def parse_address(text: str | None) -> Address | None:
    """``text`` as an IP address, or None. Accepts what a peer name or an
    ``X-Forwarded-For`` entry holds: a bare address, ``[v6]``, ``[v6]:port``,
    ``v4:port``, spaces around. An IPv4 address mapped into IPv6 (``::ffff:1.2.3.4``, as
    a dual-stack socket names an IPv4 peer) is read as the IPv4 address, so that one
    client has one name. The last 1,024 texts are remembered: parsing costs microseconds,
    and a client comes back."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:  # IPv4 with a port; an IPv6 address has two colons or more
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_address(
    peer: str | None, forwarded_for: Iterable[str], trusted: TrustedProxies
) -> Address | None:
    """The client of a request from ``peer`` carrying the ``X-Forwarded-For`` field lines
    ``forwarded_for`` (in the order received; each may list several addresses, comma
    separated), by the rule in the module's text. None when ``peer`` is not an IP address
    (a unix socket): the caller decides what such a peer is."""
    client = parse_address(peer)
    if client is None or not trusted or not trusted.trusts(client):
        return client
    entries = [entry for line in forwarded_for for entry in line.split(",")]
    for entry in reversed(entries):
        hop = parse_address(entry)
        if hop is None:
            return client  # not an address: the trusted hop that passed it on
        client = hop
        if not trusted.trusts(hop):
            return hop
    return client
