"""The Lua scripts of the shared budget (``proxy/state/lua/*.lua``, package data) and the one
place that builds each script's KEYS and ARGV.

Each script unpacks its ARGV into named locals on its first lines
(``local member, waiting, ... = unpack(ARGV, 1, n)``); the ``*_ARGV`` tuples here name the
same positions in the same order (a test compares them), and each ``*_args`` function
returns its values in that order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.resources import files
from typing import TYPE_CHECKING

from redis.asyncio.cluster import RedisCluster

from proxy.budget.slots import LINE_GRACE
from proxy.budget.windows import Limit

if TYPE_CHECKING:
    from proxy.state.redis.client import RedisClient

__all__ = [
    "FREEZE_ARGV",
    "OBSERVE_ARGV",
    "RESERVE_ARGV",
    "SNAPSHOT_ARGV",
    "BudgetKeys",
    "ClassTable",
    "Scripts",
    "class_args",
    "freeze_args",
    "hash_tagged",
    "lua",
    "observe_args",
    "reply_text",
    "reserve_args",
    "snapshot_args",
]


def lua(name: str) -> str:
    """The text of ``proxy/state/lua/<name>.lua``; ``reserve`` is preceded by ``windows``
    and ``classes`` (the window and class rules it calls)."""
    folder = files("proxy.state").joinpath("lua")
    text = folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    if name == "reserve":
        rules = [folder.joinpath(f"{r}.lua").read_text(encoding="utf-8") for r in _RULES]
        text = "".join(rules) + text
    return text


_RULES = ("windows", "classes")


def hash_tagged(client: RedisClient) -> bool:
    """True on a cluster: the keys of one credential (or of the token store) carry a hash
    tag, ``{name}``, that puts them in one slot, so each script touches one slot. A single
    server (standalone, or Sentinel's master) keeps the names it always had: no key moves
    when a deployment upgrades."""
    return isinstance(client, RedisCluster)


def reply_text(raw: bytes | str) -> str:
    """A text a script returned (the client hands bytes back unless it decodes)."""
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class Scripts:
    """The four budget scripts, registered once on the client (each call is one EVALSHA)."""

    __slots__ = ("freeze", "observe", "reserve", "snapshot")

    def __init__(self, client: RedisClient) -> None:
        self.reserve = client.register_script(lua("reserve"))
        self.snapshot = client.register_script(lua("snapshot"))
        self.observe = client.register_script(lua("observe"))
        self.freeze = client.register_script(lua("freeze"))


class BudgetKeys:
    """The Redis keys of credential ``name`` under ``prefix`` (``proxy.state.redis``'s
    docstring says what each holds), and the KEYS list of each script, built once."""

    __slots__ = ("epoch", "ext", "freezes", "frozen", "line", "reserve", "sends", "snapshot")

    def __init__(self, prefix: str, name: str, windows: int, *, tagged: bool = False) -> None:
        base = f"{prefix}{{{name}}}" if tagged else f"{prefix}{name}"
        self.sends = f"{base}:sends"
        self.frozen = f"{base}:frozen"
        self.line = f"{base}:line"
        self.freezes = f"{base}:freezes"  # the pub/sub channel
        self.epoch = f"{base}:epoch"
        self.ext = tuple(f"{base}:ext:{i}" for i in range(windows))
        # reserve.lua: sends, frozen, line, epoch, then the external sends of each window.
        self.reserve = [self.sends, self.frozen, self.line, self.epoch, *self.ext]
        # snapshot.lua: sends, frozen, epoch, then the external sends of each window.
        self.snapshot = [self.sends, self.frozen, self.epoch, *self.ext]

    def observe(self, index: int) -> list[str]:
        """observe.lua: the sends, and window ``index``'s external sends."""
        return [self.sends, self.ext[index]]


RESERVE_ARGV = (
    "member",
    "waiting",
    "served",
    "cursor",
    "known_epoch",
    "new_epoch",
    "me",
    "guard",
    "horizon",
    "grace",
    "k",
)


def reserve_args(
    *,
    member: str,
    waiting: bool,
    served: float,
    cursor: float,
    known_epoch: str,
    new_epoch: str,
    replica: str,
    guard: float,
    horizon: float,
    limits: Sequence[Limit],
) -> list[str | float]:
    """ARGV of reserve.lua, one send's reservation:

    1. ``member``: the send's id in the sorted set (``replica:seq``);
    2. ``waiting``: 1 if this replica has requests queued (it takes a place in line);
    3. ``served``: Redis time this replica last got a slot (its order in line);
    4. ``cursor``: Redis time of the newest send already in its view;
    5. ``known_epoch``: the epoch of the state it knows ("" for none yet);
    6. ``new_epoch``: the epoch to set if Redis holds none;
    7. ``me``: the replica's id (its field in the line);
    8. ``guard``: seconds added to every window;
    9. ``horizon``: seconds a send is kept (longest window plus guard);
    10. ``grace``: LINE_GRACE, seconds;
    11. ``k``: the number of windows; then, per window, its requests and its seconds;
    then, with classes of service, :func:`class_args`.

    Times are formatted as Redis time is, to the microsecond."""
    args: list[str | float] = [
        member,
        int(waiting),
        f"{served:.6f}",
        f"{cursor:.6f}",
        known_epoch,
        new_epoch,
        replica,
        guard,
        horizon,
        LINE_GRACE,
        len(limits),
    ]
    for limit in limits:
        args += (limit.requests, limit.per_seconds)
    return args


ClassTable = tuple[
    str, Sequence[tuple[str, Sequence[int]]], Mapping[str, Sequence[tuple[int, float]]]
]
"""The classes of service as reserve.lua's class rules take them: the default class (of a
send whose member names none), per class its name and its reservation in each window (0
where it holds none), and per paced class its bucket in each window (size, refill per
second)."""


def class_args(cls: str | None, table: ClassTable | None) -> list[str | float]:
    """The ARGV that follow reserve.lua's windows for a send of class ``cls``
    (classes.lua): the class, the default class, the number of classes, then per class its
    name and its reservation in each window; then 1 if ``cls`` is paced (each window's
    bucket size and refill per second follow), else 0. None for either: no class rule."""
    if cls is None or table is None:
        return []
    default, reserves, paces = table
    args: list[str | float] = [cls, default, len(reserves)]
    for name, held in reserves:
        args += (name, *held)
    buckets = paces.get(cls, ())
    args.append(1 if buckets else 0)
    for size, rate in buckets:
        args += (size, repr(rate))
    return args


SNAPSHOT_ARGV = ("horizon", "new_epoch")


def snapshot_args(*, horizon: float, new_epoch: str) -> list[str | float]:
    """ARGV of snapshot.lua: 1. ``horizon``, seconds of sends to read back; 2. ``new_epoch``,
    the epoch to set if Redis holds none."""
    return [horizon, new_epoch]


OBSERVE_ARGV = ("used", "span", "requests", "prefix")


def observe_args(*, used: int, span: float, requests: int, prefix: str) -> list[str | float]:
    """ARGV of observe.lua: 1. ``used``, the sends echowin counts in the window; 2. ``span``,
    the window's seconds plus the guard; 3. ``requests``, its limit; 4. ``prefix``, unique
    per report (members ``prefix:j`` are the external sends it adds)."""
    return [used, span, requests, prefix]


FREEZE_ARGV = ("seconds", "channel", "replica")


def freeze_args(*, seconds: float, channel: str, replica: str) -> list[str | float]:
    """ARGV of freeze.lua: 1. ``seconds`` of no send from Redis' now; 2. ``channel``, where
    the freeze is published; 3. ``replica``, the id that publishes it (its own listener
    ignores it)."""
    return [seconds, channel, replica]
