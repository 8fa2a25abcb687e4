"""The failed-authentication throttle (proxy/auth/throttle.py): aiolimiter's leaky bucket per
client, in a bounded TTL cache. No sockets, no sleeping: the loop's clock is moved by hand,
as aiolimiter's own tests do (both the buckets and the cache read it)."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from proxy.auth.throttle import AuthThrottle, client_key

A = ipaddress.ip_address("198.51.100.1")
B = ipaddress.ip_address("198.51.100.2")
C = ipaddress.ip_address("198.51.100.3")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    made = Clock()
    monkeypatch.setattr(asyncio.get_running_loop(), "time", made)
    return made


async def fail(throttle: AuthThrottle, client: object, times: int = 1) -> None:
    for _ in range(times):
        await throttle.failed(client)  # type: ignore[arg-type]


async def test_a_client_is_refused_once_its_bucket_is_full_and_again_as_it_leaks(
    clock: Clock,
) -> None:
    throttle = AuthThrottle(requests=5, per_seconds=60, max_clients=100)
    assert throttle.idle and throttle.retry_after(A) is None
    await fail(throttle, A, 4)
    assert throttle.retry_after(A) is None  # each failure is one unit: 4 of 5
    await fail(throttle, A)
    assert throttle.retry_after(A) == 12  # one unit leaks in 60 / 5 s
    assert throttle.retry_after(B) is None  # another client is not touched
    clock.now += 11.9
    assert throttle.retry_after(A) == 12
    clock.now += 0.2
    assert throttle.retry_after(A) is None  # one unit leaked: room for one more failure
    await fail(throttle, A)
    assert throttle.retry_after(A) == 12


async def test_retry_after_is_a_whole_second_at_least(clock: Clock) -> None:
    throttle = AuthThrottle(requests=10, per_seconds=1, max_clients=100)
    await fail(throttle, A, 10)
    assert throttle.retry_after(A) == 1


async def test_a_failure_never_waits_even_on_a_full_bucket(clock: Clock) -> None:
    throttle = AuthThrottle(requests=2, per_seconds=60, max_clients=100)
    for _ in range(4):
        step = throttle.failed(A)
        with pytest.raises(StopIteration):
            step.send(None)  # done in one step: never suspended
    clock.now += 30  # a full bucket was not overfilled: one unit leaked makes room
    assert throttle.retry_after(A) is None


async def test_a_lookup_holds_a_place_while_it_runs_and_success_leaves_nothing(
    clock: Clock,
) -> None:
    throttle = AuthThrottle(requests=3, per_seconds=60, max_clients=100)
    lookups = [throttle.looking_up(A, f"egw_guess{i}") for i in range(3)]
    assert not throttle.idle
    assert throttle.retry_after(A) == 20  # three under way: a fourth would overfill
    lookups[0].end()
    lookups[0].end()  # once only
    assert throttle.retry_after(A) is None
    await fail(throttle, A)  # the second one failed
    lookups[1].end()
    with lookups[2]:
        pass  # the third succeeded
    assert throttle.retry_after(A) is None
    await fail(throttle, A, 2)
    assert throttle.retry_after(A) == 20
    with throttle.looking_up(B, "egw_b"):
        pass
    assert throttle.retry_after(B) is None


async def test_a_client_whose_lookups_all_succeed_is_not_tracked(clock: Clock) -> None:
    throttle = AuthThrottle(requests=3, per_seconds=60, max_clients=100)
    for _ in range(10):
        with throttle.looking_up(A, "egw_a"):
            pass
    assert throttle.idle


async def test_a_bucket_that_has_leaked_empty_is_forgotten(clock: Clock) -> None:
    throttle = AuthThrottle(requests=3, per_seconds=60, max_clients=100)
    await fail(throttle, A, 3)
    clock.now += 59.9
    assert not throttle.idle
    clock.now += 0.2
    assert throttle.idle  # no unit can be left: the entry goes
    assert throttle.retry_after(A) is None


async def test_the_clients_tracked_are_bounded_the_least_recently_seen_go_first(
    clock: Clock,
) -> None:
    throttle = AuthThrottle(requests=1, per_seconds=60, max_clients=2)
    await fail(throttle, A)
    await fail(throttle, B)
    assert throttle.retry_after(A) == 60  # A seen again: B is now the least recent
    await fail(throttle, C)
    assert throttle.retry_after(B) is None
    assert throttle.retry_after(A) == throttle.retry_after(C) == 60


async def test_an_ipv6_client_is_its_slash_64(clock: Clock) -> None:
    throttle = AuthThrottle(requests=2, per_seconds=60, max_clients=100)
    await fail(throttle, ipaddress.ip_address("2001:db8:1:2::1"))
    await fail(throttle, ipaddress.ip_address("2001:db8:1:2:ffff::9"))
    assert throttle.retry_after(ipaddress.ip_address("2001:db8:1:2::77")) == 30
    assert throttle.retry_after(ipaddress.ip_address("2001:db8:1:3::1")) is None
    assert client_key(None) == client_key(None)  # peers without an address: one bucket
    # The families never share a bucket, even where their leading bytes agree.
    v4, v6 = ipaddress.ip_address("32.1.13.184"), ipaddress.ip_address("2001:db8::1")
    assert client_key(v4) != client_key(v6) and client_key(v4) != client_key(None)
    await fail(throttle, None, 2)
    assert throttle.retry_after(None) == 30


async def test_requests_of_one_token_looked_up_at_once_hold_one_place(clock: Clock) -> None:
    """A busy service whose token left the cache sends many requests at once; the
    authenticator makes one store lookup for them all, and the bucket counts one place:
    its requests are never refused for lookups, however many are under way."""
    throttle = AuthThrottle(requests=3, per_seconds=60, max_clients=100)
    lookups = [throttle.looking_up(A, "egw_service") for _ in range(50)]
    assert throttle.retry_after(A) is None
    guesses = [throttle.looking_up(A, f"egw_guess{i}") for i in range(2)]
    assert throttle.retry_after(A) == 20  # three distinct tokens under way: full
    for lookup in lookups + guesses:
        lookup.end()
    assert throttle.idle
