"""aiohttp's private parts the gateway builds on, all in this module.

aiohttp documents its web server and its ClientSession; the gateway goes under both (the
lobby takes connections before aiohttp's handler, the upstream pool speaks through
aiohttp's client protocol without a session), and so depends on what aiohttp does not
promise. Every such name is below, with the name the gateway uses for it; the pin in
pyproject.toml holds aiohttp to the minor series (``AIOHTTP_SERIES``) that
tests/test_aiohttp_compat.py checked, naming each one that is gone or changed
(docs/operations.md: "Moving the aiohttp pin").

The listeners (proxy/server/):

- ``RequestHandler._request_count`` (requests parsed on the connection: a whole head came)
  and ``BaseProtocol._loop``, as :class:`HandlerState`'s ``requests_parsed`` and
  ``event_loop`` (aiohttp's own slots under the gateway's names: reading one costs what
  reading aiohttp's does);
- ``RequestHandler._waiter``, ``._messages``, ``._request_in_progress``, ``._keepalive``,
  ``._close``, ``._force_close``, ``._payload_parser`` and ``BaseProtocol._upgraded``
  (:func:`handler_idle`), ``BaseProtocol._paused`` (:func:`writing_paused`);
- ``RequestHandler``'s methods the listeners override or call, with their signatures:
  ``handle_error(request, status, exc, message)``, ``log_access(request, response, time)``,
  ``log_exception(*args, **kw)``, ``force_close()`` (:data:`HANDLER_HOOKS`);
- ``web.Server._loop`` and ``._kwargs``, how aiohttp makes a handler (:func:`new_handler`);
  ``web.Server.pre_shutdown()``;
- ``AppRunner._make_server()``, where aiohttp makes the Server whose class the gateway then
  changes, and ``AppRunner._shutdown_timeout`` (:class:`ServerMaking`);
- ``LineTooLong.args``: (line, limit, actual size) (:func:`line_limit`);
  ``BaseRequest.writer.output_size`` (:func:`answer_started`);
- ``BaseRequest.protocol``: the connection's handler, read once per request by
  proxy/server/proxy_handler.py (``take_held``, ``on_its_way``);
- ``BaseRequest._headers``: what ``request.headers`` returns, and ``BaseRequest._cache``,
  the dict where aiohttp's ``reify`` keeps it once read (``"headers"``), both named in
  ``BaseRequest.ATTRS`` (:func:`replace_fields`, for tracing's ``traceparent``);
- ``aiohttp.web_response.SERVER_SOFTWARE``: the ``Server`` field of an answer that sets
  none, a module global read as each head is written (:func:`name_servers`);
- a class changed on an object aiohttp made (:func:`retype`): the Server, and the proxy
  app's router, whose ``UrlDispatcher.resolve(request)`` is what the app calls to route.

The upstream pool (proxy/upstream/pool.py):

- ``aiohttp.client_proto.ResponseHandler(loop)`` (:data:`Connection`), its
  ``set_response_params`` (:func:`start_exchange`), ``read()`` (a message with ``code``
  and ``headers``, and the body's StreamReader), ``should_close``, ``is_connected()``,
  ``set_exception(exc)``, ``close()``;
- ``aiohttp.http_writer.StreamWriter(protocol, loop)`` (:func:`start_exchange`), its
  ``enable_chunking()``, ``write_headers(status_line, headers)``, ``write(chunk)``,
  ``write_eof()``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from aiohttp import web, web_response
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_writer import StreamWriter
from multidict import CIMultiDictProxy

AIOHTTP_SERIES = "3.14"
"""The minor series these names were read from (pyproject.toml pins aiohttp to it)."""

T = TypeVar("T")
H = TypeVar("H", bound=web.RequestHandler)

Connection = ResponseHandler
"""aiohttp's client protocol: one connection to echowin, writing requests and parsing
answers with aiohttp's parser."""

HANDLER_HOOKS = ("handle_error", "log_access", "log_exception", "force_close")
"""``RequestHandler``'s methods the listeners override or call."""


class AiohttpChanged(RuntimeError):
    """An aiohttp internal the gateway builds on is gone: see docs/operations.md."""


def _slot(cls: type, name: str) -> Any:
    """The slot descriptor ``name`` that ``cls`` (or a class it derives from) defines."""
    for klass in cls.__mro__:
        descriptor = vars(klass).get(name)
        if descriptor is not None and hasattr(descriptor, "__set__"):
            return descriptor
    raise AiohttpChanged(f"aiohttp {aiohttp.__version__}: {cls.__name__}.{name} is gone")


class HandlerState(web.RequestHandler):
    """aiohttp's connection handler with the private state the listeners read under names
    of the gateway's own: the very slots aiohttp keeps."""

    __slots__ = ()
    if TYPE_CHECKING:
        requests_parsed: int
        """Requests whose whole head aiohttp parsed on this connection."""
        event_loop: asyncio.AbstractEventLoop
    else:
        requests_parsed = _slot(web.RequestHandler, "_request_count")
        event_loop = _slot(web.RequestHandler, "_loop")


IDLE_STATE = (
    "_waiter",
    "_messages",
    "_request_in_progress",
    "_keepalive",
    "_close",
    "_force_close",
    "_upgraded",
    "_payload_parser",
    "_paused",
)
"""The handler's attributes :func:`handler_idle` and :func:`writing_paused` read."""


def handler_idle(handler: web.RequestHandler) -> bool:
    """aiohttp's handler waits for a next request it has none of, and will keep the
    connection. Anything unknown reads as busy."""
    waiter = getattr(handler, "_waiter", None)
    return (
        waiter is not None
        and not waiter.done()
        and not getattr(handler, "_messages", True)
        and not getattr(handler, "_request_in_progress", True)
        and getattr(handler, "_keepalive", False) is True
        and not getattr(handler, "_close", True)
        and not getattr(handler, "_force_close", True)
        and not getattr(handler, "_upgraded", True)
        and getattr(handler, "_payload_parser", True) is None
    )


def writing_paused(handler: web.RequestHandler) -> bool:
    """The transport asked the handler to stop writing (its buffer is full); unknown reads
    as paused."""
    return bool(getattr(handler, "_paused", True))


def new_handler(server: web.Server, cls: type[H]) -> H:
    """A connection handler of class ``cls`` for ``server``, made as aiohttp's Server makes
    its own (its loop, the app's ``handler_args``)."""
    return cls(server, loop=server._loop, **server._kwargs)


def retype(obj: object, cls: type[T]) -> T:
    """``obj``, made by aiohttp, as ``cls``: a subclass of its class that adds attributes
    and overrides methods but needs nothing of aiohttp's making."""
    obj.__class__ = cls
    assert isinstance(obj, cls)
    return obj


class ServerMaking(web.AppRunner):
    """An AppRunner whose Server, once aiohttp has made it, is of ``server_class`` and is
    given to ``server_made``; ``shutdown_timeout``: the grace aiohttp gives its handlers
    at shutdown (seconds), which a subclass may shorten."""

    server_class: type[web.Server] = web.Server

    async def _make_server(self) -> web.Server:
        server = retype(await super()._make_server(), self.server_class)
        self.server_made(server)
        return server

    def server_made(self, server: web.Server) -> None:
        """The runner's Server, of ``server_class``, before it takes a connection."""

    @property
    def shutdown_timeout(self) -> float:
        return self._shutdown_timeout

    @shutdown_timeout.setter
    def shutdown_timeout(self, seconds: float) -> None:
        self._shutdown_timeout = seconds


def line_limit(exc: LineTooLong) -> object:
    """The limit a too long line passed (aiohttp's ``max_line_size`` or
    ``max_field_size``), which tells which of them it was; None if not told."""
    return exc.args[1] if len(exc.args) > 1 else None


def answer_started(request: web.BaseRequest) -> bool:
    """Some of an answer to ``request`` was written already (no other answer can follow)."""
    return request.writer.output_size > 0


def start_exchange(
    proto: ResponseHandler,
    loop: asyncio.AbstractEventLoop,
    *,
    skip_body: bool,
    bufsize: int,
) -> StreamWriter:
    """Ready ``proto`` for one answer, read as it comes (never decompressed; its head only
    with ``skip_body``, for a HEAD request; ``bufsize``: bytes read at a time), and a
    writer for the request on it."""
    proto.set_response_params(
        skip_payload=skip_body,
        read_until_eof=True,
        auto_decompress=False,
        read_bufsize=bufsize,
    )
    return StreamWriter(proto, loop)


def replace_fields(request: web.BaseRequest, fields: CIMultiDictProxy[str]) -> None:
    """``request.headers`` is ``fields`` from now on (``raw_headers`` stay as received).
    aiohttp's own ``clone(headers=...)`` makes a new request, its URL and raw fields again,
    at ten times the cost."""
    if not {"_headers", "_cache"} <= web.BaseRequest.ATTRS:
        raise AiohttpChanged("aiohttp.web.BaseRequest._headers or ._cache is gone")
    request._headers = fields
    request._cache["headers"] = fields  # where reify keeps ``headers`` once read


def name_servers(name: str) -> None:
    """The ``Server`` field of every answer this process's aiohttp servers write without
    one: ``name``, instead of aiohttp's default naming Python's and aiohttp's versions. It
    costs nothing per answer (aiohttp reads the global as it writes the head), where an
    ``on_response_prepare`` hook costs two coroutines on every answer."""
    if not isinstance(vars(web_response).get("SERVER_SOFTWARE"), str):
        raise AiohttpChanged("aiohttp.web_response.SERVER_SOFTWARE is gone")
    vars(web_response)["SERVER_SOFTWARE"] = name


__all__ = [
    "AIOHTTP_SERIES",
    "HANDLER_HOOKS",
    "IDLE_STATE",
    "AiohttpChanged",
    "Connection",
    "HandlerState",
    "HttpProcessingError",
    "LineTooLong",
    "ServerMaking",
    "StreamWriter",
    "answer_started",
    "handler_idle",
    "line_limit",
    "name_servers",
    "new_handler",
    "replace_fields",
    "retype",
    "start_exchange",
    "writing_paused",
]
