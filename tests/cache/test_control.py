"""Cache-Control both ways: the caller's directives, and how long echowin's answer may be
kept. No sockets; ``now`` passed in."""

from __future__ import annotations

import math
from email.utils import formatdate

from multidict import CIMultiDict

from proxy.cache.control import Directives, answer_ttl, request_directives


def test_request_directives() -> None:
    assert request_directives(None) == Directives()
    assert request_directives(None, ["no-cache"]) == Directives(no_cache=True)
    assert request_directives(["max-age=5, max-stale=30"]) == Directives(
        max_age=5.0, max_stale=30.0
    )
    assert request_directives(["max-stale"]).max_stale == math.inf
    assert request_directives(["max-stale=0"]).max_stale == 0.0
    assert request_directives(["ONLY-IF-CACHED"]).only_if_cached
    assert request_directives(["no-store", "no-cache"]) == Directives(no_cache=True, no_store=True)


def test_bad_arguments_are_read_the_safe_way() -> None:
    assert request_directives(["max-age=soon"]).max_age == 0.0  # ask echowin
    assert request_directives(["max-stale=-1"]).max_stale is None  # as not sent
    assert request_directives(['max-stale="10"']).max_stale == 10.0


def fields(**given: str) -> CIMultiDict[str]:
    return CIMultiDict({k.replace("_", "-"): v for k, v in given.items()})


def ttl(headers: CIMultiDict[str], route_ttl: float = 60.0, now: float = 1_000_000.0) -> float:
    return answer_ttl(route_ttl, headers, headers.getall("Cache-Control", ()), now)


def test_the_route_ttl_when_echowin_says_nothing() -> None:
    assert ttl(fields()) == 60.0


def test_echowin_can_forbid_keeping() -> None:
    for value in ("no-store", "private", "no-cache", "public, no-store"):
        assert ttl(fields(Cache_Control=value)) == 0.0
    assert ttl(fields(Set_Cookie="session=1")) == 0.0
    assert ttl(fields(Vary="*")) == 0.0
    assert ttl(fields(Vary="Accept-Encoding")) == 60.0
    two_lines = CIMultiDict([("Vary", "Accept-Encoding"), ("Vary", "User-Agent")])
    assert ttl(two_lines) == 0.0  # the second line counts too
    assert ttl(CIMultiDict([("Vary", "Accept"), ("Vary", "*")])) == 0.0


def test_echowin_can_shorten_but_not_lengthen() -> None:
    assert ttl(fields(Cache_Control="max-age=5")) == 5.0
    assert ttl(fields(Cache_Control="max-age=600")) == 60.0
    assert ttl(fields(Cache_Control="max-age=600, s-maxage=7")) == 7.0
    assert ttl(fields(Cache_Control="max-age=x")) == 0.0


def test_expires_counts_from_echowins_date() -> None:
    now = 1_000_000.0
    date = formatdate(now - 100, usegmt=True)
    expires = formatdate(now - 100 + 20, usegmt=True)
    assert ttl(fields(Date=date, Expires=expires), now=now) == 20.0
    assert ttl(fields(Expires=formatdate(now + 30, usegmt=True)), now=now) == 30.0
    assert ttl(fields(Expires="0"), now=now) == 0.0  # invalid: already expired
    assert ttl(fields(Expires=formatdate(now - 5, usegmt=True)), now=now) == 0.0


def test_must_revalidate_and_proxy_revalidate() -> None:
    from proxy.cache.control import must_revalidate

    assert not must_revalidate([])
    assert not must_revalidate(["max-age=60, public"])
    assert must_revalidate(["max-age=60", "Must-Revalidate"])
    assert must_revalidate(["proxy-revalidate, max-age=5"])
