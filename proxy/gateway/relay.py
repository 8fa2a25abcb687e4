"""echowin's answer back to the caller, the key watch applied (proxy/gateway/keywatch.py):
its end-to-end fields less those the caller never gets and every one holding a form of
the key; its body searched for the key as the caller would read it, masked where it can
be, the connection cut where it cannot (a compressed body streamed)."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import Credential
from proxy.errors import Reason
from proxy.gateway import answers
from proxy.gateway.account import Exchange
from proxy.gateway.keywatch import (
    Inflated,
    KeyWatch,
    Unreadable,
    Watches,
    coding_of,
    decoded,
    fields_text,
    leaking_fields,
)
from proxy.upstream import HOP_BY_HOP, Upstream, UpstreamResponse, connection_tokens

log = logging.getLogger("echowin_gateway.proxy")

WATCHES = web.AppKey("key_watches", Watches)
"""The proxy app's key watches (proxy/gateway/keywatch.py), one per credential."""

# echowin's own budget view is replaced by the caller's (the key's budget is shared).
_DROP_RESPONSE = frozenset(
    {
        "server",
        "date",
        "set-cookie",
        "x-request-id",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "ratelimit",
        "ratelimit-policy",
        "server-timing",  # the gateway writes its own (replacing echowin's would reorder)
    }
)
# What never passes: the list above plus the hop-by-hop fields (lower case).
_SKIP_RESPONSE = _DROP_RESPONSE | HOP_BY_HOP
# Response fields holding a URL: one into echowin's API becomes the gateway's own path.
_LOCATIONS = frozenset({"location", "content-location"})


class _Relayed(web.StreamResponse):
    """The caller's copy of echowin's answer. Its head waits for the first bytes of the
    body (or the end of an empty one) and leaves with them in one write, as a
    web.Response's does: one send to the caller per answer instead of two."""

    _send_headers_immediately = False


class _BrokenBody(Exception):
    """echowin's answer broke off (a reset, the deadline) while it was being relayed."""


class _KeyInBody(Exception):
    """The real key is in a compressed body being streamed: it cannot be masked there."""


_CUT_REASONS = {
    _BrokenBody: Reason.UPSTREAM_BROKEN_BODY,
    _KeyInBody: Reason.UPSTREAM_KEY_IN_BODY,
    Unreadable: Reason.UPSTREAM_UNREADABLE,
}


async def relay(
    request: web.Request,
    upstream: UpstreamResponse,
    pool: Upstream,
    credential: Credential,
    ex: Exchange,
    extra: dict[str, str],
) -> web.StreamResponse:
    """echowin's answer ``upstream`` to the caller of ``request``, with the ``extra``
    fields (the caller's rate-limit fields, Server-Timing, X-Request-ID); 502 when its
    coding is one the gateway cannot search for the key."""
    watch = request.app[WATCHES].of(credential.name, credential.secret.reveal())
    content = upstream.content
    assert content is not None
    # Every Content-Encoding field, as a client joins them: several codings are refused.
    codings = upstream.headers.getall("Content-Encoding", None)
    coding = coding_of(None if codings is None else ", ".join(codings))
    whole = content.is_eof() and content.exception() is None
    # The whole answer is here already (most are small): one write, no loop; unencoded, it
    # is searched with the fields, in one search.
    body = content.read_nowait() if whole else b""
    plain = whole and not coding
    response, suspect = _response(upstream, pool, credential, watch, extra, body if plain else b"")
    if plain and suspect:
        body, found = watch.masked(body)
        if found:
            _key_seen(credential, "masked")
    if coding is None or (whole and coding and body):
        try:
            body = _decoded_if_leaking(response, body, watch, coding, credential)
        except Unreadable:
            message = "echowin's answer is in an encoding the gateway cannot check"
            return answers.refuse(ex, 502, Reason.UPSTREAM_UNREADABLE, message)
    try:
        await response.prepare(request)
        if whole:
            ex.bytes_out += len(body)
            await response.write_eof(body)
            return response
        chunks = _chunks_of(content)
        if coding:
            await _stream_inflated(response, chunks, Inflated(watch, coding), ex, credential)
        else:
            await _stream_masked(response, chunks, watch, ex, credential)
        await response.write_eof()
    except ConnectionResetError:
        # The caller hung up while its answer was being written: nothing to answer, no
        # gateway fault (aiohttp's ClientConnectionResetError is a ConnectionResetError).
        ex.refusal = Reason.CLIENT_CLOSED
        ex.client_gone = True
    except (_BrokenBody, _KeyInBody, Unreadable) as exc:
        # Too late for a status: cut the connection so the client sees a broken answer.
        ex.refusal = _CUT_REASONS[type(exc)]
        if request.transport is not None:
            request.transport.close()
    return response


def watched(
    request: web.Request,
    upstream: UpstreamResponse,
    pool: Upstream,
    credential: Credential,
    body: bytes,
) -> tuple[int, list[tuple[str, str]], bytes]:
    """echowin's whole answer (``body`` read to its end) as :func:`relay` would send it,
    for the response cache to keep and share: status, fields (without the length) and
    body, the key watch applied. Unreadable for a coding the gateway cannot search."""
    watch = request.app[WATCHES].of(credential.name, credential.secret.reveal())
    response, _ = _response(upstream, pool, credential, watch, {})
    codings = upstream.headers.getall("Content-Encoding", None)
    coding = coding_of(None if codings is None else ", ".join(codings))
    if not coding:
        body, found = watch.masked(body)
        if found:
            _key_seen(credential, "masked")
    if coding is None or (coding and body):
        body = _decoded_if_leaking(response, body, watch, coding, credential)
    fields = [(k, v) for k, v in response.headers.items() if k.lower() != "content-length"]
    return response.status, fields, body


def _response(
    upstream: UpstreamResponse,
    pool: Upstream,
    credential: Credential,
    watch: KeyWatch,
    extra: dict[str, str],
    body: bytes = b"",
) -> tuple[_Relayed, bool]:
    """The caller's answer's head: echowin's status with the standard reason phrase, not
    echowin's (its free text could carry the key, and no header filter sees it); its
    fields as :func:`_relay_fields` keeps them, then ``extra``; its length if known. And
    whether ``body``, searched with the fields, may hold a form of the key."""
    response = _Relayed(status=upstream.status)
    suspect = _relay_fields(response.headers, upstream.headers, pool, credential, watch, body)
    response.headers.update(extra)
    _private(response.headers)
    length = upstream.content_length
    if length is not None:
        response.content_length = length
    return response, suspect


_VARY = "Authorization, X-API-Key, X-AGENCY-KEY"


def _private(headers: CIMultiDict[str]) -> None:
    """The answer is the caller's own (its rate-limit fields, and what its token may see):
    ``Cache-Control: private`` when echowin set none, and ``Vary`` on the fields a token
    comes in, so a shared cache between a service and the gateway keeps one token's answer
    from another."""
    if "Cache-Control" not in headers:
        headers["Cache-Control"] = "private"
    varies = headers.getall("Vary", None)
    if varies is None:
        headers["Vary"] = _VARY
    elif "*" not in (value.strip() for value in varies):
        headers["Vary"] = ", ".join((*varies, _VARY))


def _relay_fields(
    headers: CIMultiDict[str],
    given: CIMultiDictProxy[str],
    pool: Upstream,
    credential: Credential,
    watch: KeyWatch,
    body: bytes,
) -> bool:
    """echowin's end-to-end fields into ``headers``, less those the caller never gets and
    every one holding a form of the key, in its name, its value, or split across values
    (proxy/gateway/keywatch.py); a URL into echowin's API becomes the gateway's own path.
    ``body`` (an unencoded answer, or empty) is searched with them, after a newline (no
    form holds one): one search for both, the usual answer. False when none holds a form,
    True when the fields or ``body`` may."""
    named = connection_tokens(given)
    kept: list[tuple[str, str]] = []
    for name, value in given.items():
        low = name.lower()
        if low not in _SKIP_RESPONSE and low not in named:
            kept.append((name, pool.relative(value) if low in _LOCATIONS else value))
    text = fields_text(kept)
    if not watch.found(text + b"\n" + body if body else text):
        for name, value in kept:
            headers.add(name, value)
        return False
    for name, value in _without_leaking(kept, watch, credential):
        headers.add(name, value)
    return True


def _without_leaking(
    fields: list[tuple[str, str]], watch: KeyWatch, credential: Credential
) -> list[tuple[str, str]]:
    """``fields`` less every one holding a form of the key (keywatch's ``leaking_fields``)."""
    leaking = leaking_fields(watch, fields)
    if leaking:
        _key_seen(credential, "dropped")
        while leaking:  # dropping a field makes its neighbours adjacent: check them again
            fields = [field for i, field in enumerate(fields) if i not in leaking]
            leaking = leaking_fields(watch, fields)
    return fields


async def _chunks_of(content: StreamReader) -> AsyncIterator[bytes]:
    """echowin's body as it comes; _BrokenBody when it breaks off (aiohttp's own errors
    are not told apart from a caller gone, whose write raises a ClientError too)."""
    chunks = content.iter_any()
    while True:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except (aiohttp.ClientError, TimeoutError):
            raise _BrokenBody from None
        yield chunk


async def _stream_masked(
    response: web.StreamResponse,
    chunks: AsyncIterator[bytes],
    watch: KeyWatch,
    ex: Exchange,
    credential: Credential,
) -> None:
    """An identity body, every form of the key masked. The last ``watch.keep`` bytes wait
    for the next chunk: a form split between two chunks is masked too."""
    keep = watch.keep
    held = b""
    async for chunk in chunks:
        data, found = watch.masked(held + chunk if held else chunk)
        if found:
            _key_seen(credential, "masked")
        cut = max(0, len(data) - keep)
        held = data[cut:]
        if cut:
            ex.bytes_out += cut
            await response.write(memoryview(data)[:cut])
    ex.bytes_out += len(held)
    await response.write(held)


async def _stream_inflated(
    response: web.StreamResponse,
    chunks: AsyncIterator[bytes],
    inflated: Inflated,
    ex: Exchange,
    credential: Credential,
) -> None:
    """A compressed body, relayed as it came, each chunk held back until len(key) - 1
    inflated bytes follow it: the chunk that completes a key, and every one before it that
    holds a part of it, are never sent (_KeyInBody: the connection is cut)."""
    keep = inflated.keep
    held: deque[tuple[bytes, int]] = deque()  # (chunk, inflated bytes it made)
    after_first = 0  # inflated bytes of every held chunk but the first
    async for chunk in chunks:
        before = inflated.plain_bytes
        if inflated.holds_key(chunk):
            _key_seen(credential, "cut")
            raise _KeyInBody
        held.append((chunk, inflated.plain_bytes - before))
        if len(held) > 1:
            after_first += held[-1][1]
        while len(held) > 1 and after_first >= keep:
            sent, _ = held.popleft()
            after_first -= held[0][1]
            ex.bytes_out += len(sent)
            await response.write(sent)
    if inflated.ends_with_key():
        _key_seen(credential, "cut")
        raise _KeyInBody
    for sent, _ in held:
        ex.bytes_out += len(sent)
        await response.write(sent)


def _decoded_if_leaking(
    response: web.StreamResponse,
    body: bytes,
    watch: KeyWatch,
    coding: str | None,
    credential: Credential,
) -> bytes:
    """A whole compressed ``body`` as the caller gets it: as it came when no form of the
    key is in it inflated, else inflated and masked (Content-Encoding dropped). Unreadable
    for a coding the gateway cannot read (None) or a corrupt body."""
    if coding is None:
        raise Unreadable
    plain, found = watch.masked(decoded(body, coding))
    if not found:
        return body
    _key_seen(credential, "masked")
    headers = response.headers
    fields = [
        (name, value) for name, value in headers.items() if name.lower() != "content-encoding"
    ]
    # Without Content-Encoding its neighbours are adjacent: a key split around it is whole.
    headers.clear()
    headers.extend(_without_leaking(fields, watch, credential))
    response.content_length = len(plain)
    return plain


def _key_seen(credential: Credential, action: str) -> None:
    log.warning(
        "echowin's answer held the key",
        extra={"fields": {"credential": credential.name, "action": action}},
    )


__all__ = ["WATCHES", "relay", "watched"]
