"""The cache key: the query normalised, the fields that change the answer. No sockets."""

from __future__ import annotations

from proxy.cache.keys import cache_key, normalise_query, vary_value


def test_parameters_are_sorted_and_repeated_ones_keep_their_order() -> None:
    assert normalise_query("page=2&limit=20") == "limit=20&page=2"
    assert normalise_query("tagIds=b&page=1&tagIds=a") == "page=1&tagIds=b&tagIds=a"
    assert normalise_query("tagIds=a&tagIds=b") != normalise_query("tagIds=b&tagIds=a")


def test_empty_parts_go_and_nothing_is_decoded() -> None:
    assert normalise_query("&&a=1&&b=&") == "a=1&b="
    assert normalise_query("") == ""
    assert normalise_query("search=a%20b") != normalise_query("search=a+b")
    assert normalise_query("a") == "a"


def test_two_orders_of_one_query_are_one_key() -> None:
    one = cache_key("default", "/api/v1/contacts", "/api/v1/contacts", "/x?b=2&a=1", None, None)
    two = cache_key("default", "/api/v1/contacts", "/api/v1/contacts", "/x?a=1&b=2", None, None)
    assert one == two
    assert one.query == "a=1&b=2"


def test_credential_accept_and_encoding_are_part_of_the_key() -> None:
    base = ("/api/v1/tags", "/api/v1/tags", "/api/v1/tags")
    team = cache_key("default", *base, None, None)
    assert cache_key("acme", *base, None, None) != team
    assert cache_key("default", *base, ["*/*"], None) == team  # none sent reads as */*
    assert cache_key("default", *base, ["application/json"], None) != team
    assert cache_key("default", *base, None, ["gzip"]) != team


def test_field_values_are_canonical() -> None:
    assert vary_value(["GZIP, deflate", " br"]) == "gzip,deflate,br"
    assert vary_value(None, "*/*") == "*/*"
    assert vary_value([" , "], "*/*") == "*/*"


def test_fields_outside_the_safe_list_are_named() -> None:
    from proxy.cache.keys import unkeyed_fields

    assert unkeyed_fields(["Accept", "User-Agent", "Authorization", "Cache-Control"]) == []
    assert unkeyed_fields(["X-Request-ID", "traceparent", "Host", "Connection"]) == []
    named = ["If-None-Match", "accept-language", "Cookie", "X-Tenant", "Prefer"]
    assert unkeyed_fields(named) == [
        "accept-language",
        "cookie",
        "if-none-match",
        "prefer",
        "x-tenant",
    ]


def test_vary_is_read_on_every_line() -> None:
    from proxy.cache.keys import keyed_vary

    assert keyed_vary([])
    assert keyed_vary(["Accept", "accept-encoding"])
    # No keyed request carries Accept-Language: they all look alike on it.
    assert keyed_vary(["Accept-Encoding", "Accept-Language, Origin"])
    assert keyed_vary(["X-API-Key"])  # the credential's key: the same for all of a key
    assert not keyed_vary(["Accept", "*"])
    assert not keyed_vary(["Accept-Encoding", "User-Agent"])
    assert not keyed_vary(["accept,  x-forwarded-for"])
