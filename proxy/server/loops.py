"""The event loop the gateway serves on: asyncio's own, or uvloop (the ``fast`` extra).

``server.event_loop`` picks it once, at start: ``auto`` takes uvloop when it is installed
and asyncio's loop otherwise, ``uvloop`` insists on it, ``asyncio`` never uses it. Nothing
else in the gateway depends on the choice. docs/performance.md has what uvloop changes,
measured by the benchmark harness (``--loop asyncio --loop uvloop``).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

__all__ = ["EVENT_LOOPS", "EventLoop", "loop_factory", "loop_name", "resolve", "run"]


from proxy.config import EVENT_LOOPS, MISSING_UVLOOP, EventLoop, uvloop_installed

T = TypeVar("T")


def resolve(choice: EventLoop) -> Literal["asyncio", "uvloop"]:
    """The loop ``choice`` runs on here: ``auto`` is uvloop when it is installed."""
    if choice == "auto":
        return "uvloop" if uvloop_installed() else "asyncio"
    return choice


def loop_factory(choice: EventLoop) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes the loop (for ``asyncio.Runner``); None means asyncio's own. Raises
    RuntimeError when uvloop is asked for by name and is not installed."""
    if resolve(choice) == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError as exc:
        raise RuntimeError(MISSING_UVLOOP) from exc
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], choice: EventLoop = "auto") -> T:
    """``asyncio.run(main)`` on the loop ``choice`` names (same shutdown: remaining tasks
    cancelled, async generators and the default executor closed)."""
    try:
        factory = loop_factory(choice)
    except RuntimeError:
        main.close()  # never awaited: no "coroutine was never awaited" warning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: which loop ``loop`` is (for the start log line)."""
    return type(loop).__module__.partition(".")[0]
