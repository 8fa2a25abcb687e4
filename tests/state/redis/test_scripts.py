"""The Lua scripts (proxy/state/lua) against their Python side: the ARGV names each script
unpacks equal those its builder documents, and the window rule's Lua twin decides as the
reference (proxy/budget/windows.py) does, on random send sequences against a real Redis."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.budget.windows import CredentialBudget, Limit
from proxy.state.redis import scripts
from tests.state.test_token_store import scratch_redis


@pytest.mark.parametrize(
    ("name", "names", "build"),
    [
        (
            "reserve",
            scripts.RESERVE_ARGV,
            lambda: scripts.reserve_args(
                member="m",
                waiting=True,
                served=1.0,
                cursor=2.0,
                known_epoch="",
                new_epoch="e",
                replica="r",
                guard=0.25,
                horizon=60.25,
                limits=[Limit(10, 60.0)],
            ),
        ),
        (
            "snapshot",
            scripts.SNAPSHOT_ARGV,
            lambda: scripts.snapshot_args(horizon=1, new_epoch="e"),
        ),
        (
            "observe",
            scripts.OBSERVE_ARGV,
            lambda: scripts.observe_args(used=1, span=60.0, requests=10, prefix="x"),
        ),
        (
            "freeze",
            scripts.FREEZE_ARGV,
            lambda: scripts.freeze_args(seconds=1.0, channel="c", replica="r"),
        ),
    ],
)
def test_each_script_unpacks_the_arguments_its_builder_names(
    name: str, names: tuple[str, ...], build: object
) -> None:
    text = scripts.lua(name)
    found = re.search(r"local ([\w, \n]+?) =\s*unpack\(ARGV, 1, (\d+)\)", text)
    assert found is not None, f"{name}.lua unpacks its ARGV on its first lines"
    unpacked = tuple(part.strip() for part in found.group(1).split(","))
    assert unpacked == names
    assert int(found.group(2)) == len(names)
    assert callable(build)
    assert len(build()) >= len(names)


# The window rule of windows.lua, fed a time instead of Redis' clock: admits (and records)
# a send at ARGV[1] if it fits every window. ARGV: now, member, guard, k, then per window
# its requests and seconds. KEYS: sends, then each window's external sends.
_HARNESS = """
local now, member, guard, k = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local windows, ext = {}, {}
for i = 1, k do
  windows[i] = {n = tonumber(ARGV[3 + 2 * i]), span = tonumber(ARGV[4 + 2 * i]) + guard}
  ext[i] = KEYS[1 + i]
end
local wait = window_wait(KEYS[1], ext, windows, now)
if wait <= 0 then
  redis.call('ZADD', KEYS[1], string.format('%.6f', now), member)
  return {1, '0'}
end
return {0, string.format('%.6f', wait)}
"""

limits_st = st.lists(
    st.builds(Limit, st.integers(1, 4), st.sampled_from([1.0, 2.0, 5.0, 10.0])),
    min_size=1,
    max_size=3,
)
# Whole and quarter seconds: exact in binary and in the scripts' %.6f, so sends that stop
# counting exactly at `now` are compared too.
gaps_st = st.lists(st.integers(0, 12).map(lambda q: q / 4), min_size=1, max_size=40)


@pytest.mark.service
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(limits=limits_st, gaps=gaps_st, guard=st.sampled_from([0.0, 0.25]))
async def test_the_lua_window_rule_decides_as_the_python_one(
    limits: list[Limit], gaps: list[float], guard: float
) -> None:
    async with scratch_redis() as (client, prefix):
        script = client.register_script(scripts.lua("windows") + _HARNESS)
        keys = [f"{prefix}sends", *(f"{prefix}ext:{i}" for i in range(len(limits)))]
        reference = CredentialBudget(limits, guard)
        now = 1_000.0
        for i, gap in enumerate(gaps):
            now += gap
            args: list[str | float] = [now, f"m{i}", guard, len(limits)]
            for limit in limits:
                args += (limit.requests, limit.per_seconds)
            ok, wait = await script(keys=keys, args=args)
            expected_wait = reference.wait_time(now)
            admitted = reference.try_record(now)
            assert bool(ok) == admitted, f"send {i} at {now}"
            assert float(wait) == pytest.approx(max(expected_wait, 0.0), abs=1e-6)
