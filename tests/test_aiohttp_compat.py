"""aiohttp's private parts the gateway builds on (proxy/aiohttp_compat.py) are still there,
with the shapes the gateway uses: each check names the internal that is gone or changed.
Run this first when moving the aiohttp pin (docs/operations.md: "Moving the aiohttp pin");
then the lobby, hostile-server and upstream suites, which prove the behaviour."""

from __future__ import annotations

import ast
import asyncio
import inspect
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_writer import StreamWriter

from proxy import aiohttp_compat as compat

ROOT = Path(__file__).resolve().parent.parent

# (class, method, the parameters the gateway passes or overrides with, in order)
METHODS: list[tuple[type, str, tuple[str, ...]]] = [
    (web.RequestHandler, "__init__", ("self", "manager", "loop")),
    (web.RequestHandler, "handle_error", ("self", "request", "status", "exc", "message")),
    (web.RequestHandler, "log_access", ("self", "request", "response", "time")),
    (web.RequestHandler, "log_exception", ("self", "args", "kw")),
    (web.RequestHandler, "force_close", ("self",)),
    (web.Server, "pre_shutdown", ("self",)),
    (web.AppRunner, "_make_server", ("self",)),
    (web.UrlDispatcher, "resolve", ("self", "request")),
    (web.UrlMappingMatchInfo, "__init__", ("self", "match_dict", "route")),
    (ResponseHandler, "__init__", ("self", "loop")),
    (ResponseHandler, "read", ("self",)),
    (ResponseHandler, "set_exception", ("self", "exc")),
    (ResponseHandler, "is_connected", ("self",)),
    (ResponseHandler, "close", ("self",)),
    (StreamWriter, "__init__", ("self", "protocol", "loop")),
    (StreamWriter, "enable_chunking", ("self",)),
    (StreamWriter, "write_headers", ("self", "status_line", "headers")),
    (StreamWriter, "write", ("self", "chunk")),
    (StreamWriter, "write_eof", ("self",)),
]
# Keyword parameters the gateway passes by name.
KEYWORDS: list[tuple[type, str, tuple[str, ...]]] = [
    (
        ResponseHandler,
        "set_response_params",
        ("skip_payload", "read_until_eof", "auto_decompress", "read_bufsize"),
    ),
]
# Slots the gateway reads (a slot, not an instance dict's entry: HandlerState aliases it).
SLOTS = [
    (web.RequestHandler, "_request_count"),
    (web.RequestHandler, "_loop"),
    *((web.RequestHandler, name) for name in compat.IDLE_STATE),
    (web.AppRunner, "_shutdown_timeout"),
]
PROPERTIES = [(ResponseHandler, "should_close"), (web.BaseRequest, "protocol")]
# Attributes aiohttp names as a request's own (BaseRequest.ATTRS), set by the gateway.
REQUEST_ATTRS = ["_headers", "_cache"]


def _name(cls: type, attr: str) -> str:
    return f"aiohttp {aiohttp.__version__}: {cls.__module__}.{cls.__qualname__}.{attr}"


def test_the_running_aiohttp_is_the_series_the_pin_names() -> None:
    assert aiohttp.__version__.startswith(compat.AIOHTTP_SERIES + "."), aiohttp.__version__
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    major, minor = compat.AIOHTTP_SERIES.split(".")
    pin = f"aiohttp>={major}.{minor},<{major}.{int(minor) + 1}"
    assert pin in project["project"]["dependencies"], f"pyproject.toml pins {pin}"


@pytest.mark.parametrize(
    ("cls", "method", "params"), METHODS, ids=[f"{c.__name__}.{m}" for c, m, _ in METHODS]
)
def test_a_method_the_gateway_calls_or_overrides_keeps_its_parameters(
    cls: type, method: str, params: tuple[str, ...]
) -> None:
    function = inspect.getattr_static(cls, method, None)
    assert function is not None, f"{_name(cls, method)} is gone"
    names = tuple(inspect.signature(function).parameters)
    assert names[: len(params)] == params, f"{_name(cls, method)}{names}: expected {params}"


@pytest.mark.parametrize(
    ("cls", "method", "keywords"), KEYWORDS, ids=[f"{c.__name__}.{m}" for c, m, _ in KEYWORDS]
)
def test_a_method_takes_the_keywords_the_gateway_passes(
    cls: type, method: str, keywords: tuple[str, ...]
) -> None:
    function = inspect.getattr_static(cls, method, None)
    assert function is not None, f"{_name(cls, method)} is gone"
    parameters = inspect.signature(function).parameters
    missing = [k for k in keywords if k not in parameters]
    assert not missing, f"{_name(cls, method)} takes no {missing}"


@pytest.mark.parametrize(("cls", "attr"), SLOTS, ids=[f"{c.__name__}.{a}" for c, a in SLOTS])
def test_a_slot_the_gateway_reads_is_still_a_slot(cls: type, attr: str) -> None:
    owners = [k for k in cls.__mro__ if attr in vars(k)]
    assert owners, f"{_name(cls, attr)} is gone"
    assert inspect.isdatadescriptor(vars(owners[0])[attr]), f"{_name(cls, attr)} is no slot"


@pytest.mark.parametrize(
    ("cls", "attr"), PROPERTIES, ids=[f"{c.__name__}.{a}" for c, a in PROPERTIES]
)
def test_a_property_the_gateway_reads_is_still_there(cls: type, attr: str) -> None:
    assert isinstance(inspect.getattr_static(cls, attr, None), property), (
        f"{_name(cls, attr)} is gone"
    )


async def test_a_server_makes_its_handlers_from_its_loop_and_kwargs() -> None:
    """``web.Server._loop`` and ``._kwargs`` (new_handler), and HandlerState's aliases."""

    async def nothing(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    server = web.Server(nothing, max_field_size=1234)
    loop = asyncio.get_running_loop()
    assert getattr(server, "_loop", None) is loop, _name(web.Server, "_loop")
    assert getattr(server, "_kwargs", None) == {"max_field_size": 1234}, _name(
        web.Server, "_kwargs"
    )
    handler = compat.new_handler(server, compat.HandlerState)
    assert handler.max_field_size == 1234
    assert handler.event_loop is loop and handler.requests_parsed == 0
    assert not compat.handler_idle(handler)  # not connected: busy, never parked
    assert compat.writing_paused(handler) is False


async def test_the_server_maker_hook_is_where_aiohttp_makes_the_server() -> None:
    """``AppRunner._make_server`` makes the runner's Server (ServerMaking, retype)."""

    class Marked(web.Server):
        pass

    made: list[web.Server] = []

    class Runner(compat.ServerMaking):
        server_class = Marked

        def server_made(self, server: web.Server) -> None:
            made.append(server)

    runner = Runner(web.Application(), shutdown_timeout=3.0)
    await runner.setup()
    try:
        assert type(runner.server) is Marked and made == [runner.server]
        assert runner.shutdown_timeout == 3.0
        runner.shutdown_timeout = 1.0
        assert getattr(runner, "_shutdown_timeout", None) == 1.0
    finally:
        await runner.cleanup()


def test_line_too_long_tells_its_limit() -> None:
    """``LineTooLong.args[1]``: which limit a line passed (414 or 431)."""
    assert compat.line_limit(compat.LineTooLong(b"x" * 10, 8190)) == 8190


def test_start_exchange_readies_aiohttps_client_protocol() -> None:
    loop = asyncio.new_event_loop()
    try:
        proto = compat.Connection(loop)
        writer = compat.start_exchange(proto, loop, skip_body=True, bufsize=4096)
        assert isinstance(writer, StreamWriter)
    finally:
        loop.close()


# aiohttp's modules that are documented (or whose names are re-exported as aiohttp's own).
PUBLIC = {"aiohttp", "aiohttp.web", "aiohttp.hdrs", "aiohttp.streams", "aiohttp.typedefs"}


def _aiohttp_imports(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiohttp"):
            found.add(node.module or "")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("aiohttp"))
    return found


def test_no_other_module_imports_aiohttps_private_modules() -> None:
    for path in sorted((ROOT / "proxy").rglob("*.py")):
        if path.name == "aiohttp_compat.py":
            continue
        private = _aiohttp_imports(ast.parse(path.read_text(encoding="utf-8"))) - PUBLIC
        assert not private, f"{path.relative_to(ROOT)} imports {sorted(private)}: see compat"


def test_the_compat_docstring_lists_every_internal_checked_here() -> None:
    doc = compat.__doc__ or ""
    names = {m for _, m, _ in METHODS + KEYWORDS} | {a for _, a in SLOTS + PROPERTIES}
    names |= set(REQUEST_ATTRS)
    names -= {"__init__"}
    missing = [n for n in sorted(names) if n not in doc]
    assert not missing, f"proxy/aiohttp_compat.py's docstring lacks {missing}"


async def test_the_server_field_of_every_answer_is_the_name_given(
    aiohttp_client: Any,
) -> None:
    """name_servers sets the global aiohttp's responses read for their Server field."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_get("/", hello)
    compat.name_servers("echowin-gateway")
    client = await aiohttp_client(app)
    resp = await client.get("/")
    assert resp.headers["Server"] == "echowin-gateway"


async def test_replaced_fields_are_the_requests_headers(aiohttp_client: Any) -> None:
    """replace_fields sets what request.headers returns, on aiohttp's own request."""
    from multidict import CIMultiDict, CIMultiDictProxy

    assert set(REQUEST_ATTRS) <= web.BaseRequest.ATTRS

    async def echo(request: web.Request) -> web.Response:
        fields = CIMultiDict(request.headers)  # read once: reify keeps it
        fields["traceparent"] = "replaced"
        compat.replace_fields(request, CIMultiDictProxy(fields))
        return web.json_response(
            {"seen": request.headers.get("traceparent"), "kept": request.headers.get("X-Kept")}
        )

    app = web.Application()
    app.router.add_get("/", echo)
    client = await aiohttp_client(app)
    resp = await client.get("/", headers={"traceparent": "caller", "X-Kept": "yes"})
    assert await resp.json() == {"seen": "replaced", "kept": "yes"}
