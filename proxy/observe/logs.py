"""Logging set-up: JSON or text lines on stderr; one access line per request.

The access line is written by :class:`AccessLog`, not through :mod:`logging`: a LogRecord,
a formatter and a flushed write per request cost more than many a refusal itself. It
formats the same line the formatters below would and writes whole lines in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import select
import sys
import time
from json.encoder import encode_basestring_ascii
from typing import Any, Protocol, TextIO

ACCESS_LOGGER = "echowin_gateway.access"
LOGGER = "echowin_gateway"


_PROCESS_FIELDS: dict[str, object] = {}
"""Fields every line of this process carries (``worker`` in a ``serve --workers`` group)."""


def tag_process(**fields: object) -> None:
    """Add ``fields`` to every log line this process writes from now on, access lines
    included (set once, at start, before the access log's first line)."""
    _PROCESS_FIELDS.update(fields)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_PROCESS_FIELDS)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            # The class name only: exception texts may quote what they were given.
            out["exception"] = record.exc_info[0].__name__
        return json.dumps(out, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if not isinstance(fields, dict):
            fields = {}
        fields = {**_PROCESS_FIELDS, **fields}
        tail = ""
        if fields:
            tail = " " + " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp} {record.levelname.lower()} {record.name}: {record.getMessage()}{tail}"


def setup_logging(level: str, fmt: str) -> None:
    """Route the gateway's loggers to stderr in the chosen format (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for name in (LOGGER, "aiohttp"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    # aiohttp's own access log would duplicate ours, without token or route.
    logging.getLogger("aiohttp.access").disabled = True


class TraceIds(Protocol):
    """A request's trace and span ids, in hex (proxy/observe/tracing.py's RequestSpan)."""

    trace_id: str
    span_id: str


class LogSettings(Protocol):
    """The ``logging:`` config section (proxy.config.LoggingConfig)."""

    @property
    def level(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def access_log(self) -> bool: ...


def _json(value: str | None) -> str:
    return "null" if value is None else encode_basestring_ascii(value)


def _json_int(value: int | None) -> str:
    return "null" if value is None else str(value)


def _text(value: object) -> str:
    """A text-format value: ``-`` for none."""
    return "-" if value is None else str(value)


USER_AGENT_MAX = 200
"""Characters of a ``User-Agent`` the access log keeps."""
_AGENTS = 256  # distinct user agents kept formatted


# Worker processes share stderr, often a pipe: a write of at most PIPE_BUF bytes reaches
# it whole, a longer one may be cut by another process's lines. Lines are ASCII (JSON
# escapes; the text format's values are validated ASCII), so characters count bytes.
_WRITE_MAX = select.PIPE_BUF if hasattr(select, "PIPE_BUF") else 512
_MIDDLES = 1024  # distinct (token, method, route, credential) fields kept formatted
_JSON_HEAD = ',"level":"info","logger":"' + ACCESS_LOGGER + '","msg":"request","request_id":'
_TEXT_HEAD = " info " + ACCESS_LOGGER + ": request request_id="


class AccessLog:
    """One line per proxied request on stderr (or ``stream``), in batches.

    A line is the one :class:`JsonFormatter` (or :class:`TextFormatter`) would make of
    ``logging.getLogger(ACCESS_LOGGER).info("request", extra={"fields": ...})``, built by
    hand; milliseconds have three decimals (``0.000``, not ``0.0``).

    Lines wait in memory and are written together, whole, in one ``write`` and one flush:
    at most ``FLUSH_SECONDS`` after the first of them, at once when ``BUFFER_LINES`` wait,
    and on :meth:`flush` / :meth:`close` (the runtime closes it on shutdown, SIGTERM
    included). Only a process killed outright loses the last batch. Lines never
    interleave: every write happens on the event loop's thread and holds whole lines, at
    most PIPE_BUF bytes of them, so even worker processes sharing one pipe keep each
    other's lines whole. With no running event loop, or after :meth:`close`, a line is
    written at once.
    """

    FLUSH_SECONDS = 0.2
    BUFFER_LINES = 512

    def __init__(self, stream: TextIO | None = None) -> None:
        """``stream``: where lines go; None means ``sys.stderr`` as it is when writing."""
        self.stream = stream
        self.enabled = True
        self.json = True
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._second = -1
        self._stamp = ""
        # The formatted token, method, route and credential fields, by their values.
        self._middles: dict[tuple[str | None, str, str, str, str | None], str] = {}
        # User agents as a quoted, escaped ASCII string (the same in both formats); None's
        # is the format's own (null, -).
        self._agents: dict[str | None, str] = {}

    def configure(self, settings: LogSettings) -> None:
        """Apply ``logging.access_log``, ``logging.level`` and ``logging.format`` (at start and
        on a reload). Access lines are info lines: a level above info turns them off."""
        self.flush()  # lines already made keep the format they were made in
        self.enabled = settings.access_log and settings.level.lower() in ("debug", "info")
        self.json = settings.format == "json"
        self._middles.clear()
        self._agents.clear()

    def request(
        self,
        request_id: str,
        token_id: str | None,
        token_name: str,
        method: str,
        route: str,
        credential: str | None,
        status: int,
        upstream_status: int | None,
        queue_seconds: float,
        upstream_seconds: float,
        total_seconds: float,
        bytes_out: int,
        refusal: str | None,
        cache: str | None = None,
        client: str | None = None,
        user_agent: str | None = None,
        trace: TraceIds | None = None,
    ) -> None:
        """Log one answered request. Times come in seconds and are shown as milliseconds
        (``queue_ms``, ``upstream_ms``, ``total_ms``) with three decimals. ``cache`` (a GET
        through the response cache) and ``trace`` (tracing on) add fields when given;
        ``user_agent`` is cut to ``USER_AGENT_MAX`` characters, a JSON string in both
        formats. The text format shows ``-`` for what is not known."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        key = (token_id, token_name, method, route, credential)
        middle = self._middles.get(key)
        if middle is None:
            middle = self._middle(*key)
        agent = self._agents.get(user_agent) or self._agent(user_agent)
        tail = "" if cache is None and trace is None else self._tail(cache, trace)
        if self.json:
            line = (
                f'{{"time":"{self._stamp}.{int((now - second) * 1000):03d}Z"{_JSON_HEAD}'
                f"{encode_basestring_ascii(request_id)},{middle},"
                f'"status":{status},"upstream_status":{_json_int(upstream_status)},'
                f'"queue_ms":{queue_seconds * 1000:.3f},'
                f'"upstream_ms":{upstream_seconds * 1000:.3f},'
                f'"total_ms":{total_seconds * 1000:.3f},"bytes":{bytes_out},'
                f'"refusal":{_json(refusal)},"client_address":{_json(client)},'
                f'"user_agent":{agent}{tail}}}\n'
            )
        else:
            line = (
                f"{self._stamp}{_TEXT_HEAD}{request_id} {middle} status={status} "
                f"upstream_status={_text(upstream_status)} "
                f"queue_ms={queue_seconds * 1000:.3f} "
                f"upstream_ms={upstream_seconds * 1000:.3f} "
                f"total_ms={total_seconds * 1000:.3f} bytes={bytes_out} "
                f"refusal={_text(refusal)} client_address={_text(client)} "
                f"user_agent={agent}{tail}\n"
            )
        self._add(line)

    def _agent(self, user_agent: str | None) -> str:
        """``user_agent`` cut and escaped, kept for the next request that sends it."""
        if len(self._agents) >= _AGENTS:
            self._agents.clear()
        if user_agent is None:
            agent = "null" if self.json else "-"
        else:
            agent = encode_basestring_ascii(user_agent[:USER_AGENT_MAX])
        self._agents[user_agent] = agent
        return agent

    def _tail(self, cache: str | None, trace: TraceIds | None) -> str:
        """The fields only some lines have: ``cache``, then ``trace_id`` and ``span_id``."""
        tail = ""
        if self.json:
            if cache is not None:
                tail = f',"cache":{_json(cache)}'
            if trace is not None:
                tail += f',"trace_id":"{trace.trace_id}","span_id":"{trace.span_id}"'
        else:
            if cache is not None:
                tail = f" cache={cache}"
            if trace is not None:
                tail += f" trace_id={trace.trace_id} span_id={trace.span_id}"
        return tail

    def _middle(
        self,
        token_id: str | None,
        token_name: str,
        method: str,
        route: str,
        credential: str | None,
    ) -> str:
        """The fields a token repeats on every request to a route, formatted once."""
        if self.json:
            middle = (
                f'"token_id":{_json(token_id)},"token_name":{_json(token_name)},'
                f'"method":{_json(method)},"route":{_json(route)},'
                f'"credential":{_json(credential)}'
            )
            for key, value in _PROCESS_FIELDS.items():
                middle += f",{_json(key)}:{json.dumps(value, default=str)}"
        else:
            middle = (
                f"token_id={_text(token_id)} token_name={token_name} method={method} "
                f"route={route} credential={_text(credential)}"
            )
            for key, value in _PROCESS_FIELDS.items():
                middle += f" {key}={_text(value)}"
        if len(self._middles) >= _MIDDLES:
            self._middles.clear()
        self._middles[(token_id, token_name, method, route, credential)] = middle
        return middle

    def _add(self, line: str) -> None:
        lines = self._lines
        lines.append(line)
        if len(lines) >= self.BUFFER_LINES or self._closed:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(self.FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """Write every waiting line now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines = self._lines
        if not lines:
            return
        self._lines = []
        stream = self.stream if self.stream is not None else sys.stderr
        # A log that cannot be written (stderr gone) must not take requests down with it.
        with contextlib.suppress(OSError, ValueError):
            start, size = 0, 0
            for end, line in enumerate(lines):
                if size + len(line) > _WRITE_MAX and end > start:
                    stream.write("".join(lines[start:end]))
                    stream.flush()
                    start, size = end, 0
                size += len(line)
            stream.write("".join(lines[start:]))
            stream.flush()

    def close(self) -> None:
        """Write what waits; from now on every line is written at once."""
        self._closed = True
        self.flush()
