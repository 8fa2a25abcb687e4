"""Redis over TLS (a CA file, a client certificate, a server name) and as an ACL user with
exactly the permissions docs/operations.md gives (issue 20, point 3).

A private redis-server speaks TLS only, demands a client certificate and holds a
certificate for ``redis.test`` alone (not for 127.0.0.1, the address connected to); the
certificates are made by the openssl command. The ACL user is made with ``acl_rule``,
the text the docs show.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.auth.tokens import TokenRecord, hash_secret
from proxy.budget.windows import Limit
from proxy.config.stores import RedisTlsConfig
from proxy.sim import Simulator
from proxy.state.redis.client import RedisOptions, open_redis
from proxy.state.redis.preflight import StateAccessError, acl_rule, check_access
from proxy.state.redis.slots import RedisSlots
from proxy.state.redis.tokens import RedisTokenStore
from tests.procs import REAL_KEY, Spawn, child_env, free_ports, load_loop, run_cli, write_config
from tests.state.redis import shapes
from tests.state.redis.test_replicas import (
    mint,
    replica_configs,
    served_arrivals,
    sim_server,
    start_all,
)
from tests.test_budget_e2e import LIMITS, max_in_any_window

__all__ = ["sim_server"]  # the fixture, imported for the tests here

USER, PASSWORD = "gateway", "acl-pass-0123456789"
ROOT = Path(__file__).resolve().parents[3]


@dataclass
class TlsRedis:
    port: int
    certs: shapes.Certs

    def url(self, scheme: str = "rediss") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def tls(self, **overrides: object) -> RedisTlsConfig:
        fields: dict[str, object] = {
            "ca_file": str(self.certs.ca),
            "cert_file": str(self.certs.client_cert),
            "key_file": str(self.certs.client_key),
            "server_name": "redis.test",
        }
        fields.update(overrides)
        return RedisTlsConfig.model_validate(fields)

    def admin(self) -> shapes.redis.Redis:
        return shapes.client(self.port, **shapes.tls_client_kwargs(self.certs))

    def set_user(self, name: str, rule: str) -> None:
        words = rule.split()
        with self.admin() as c:
            c.execute_command("ACL", "SETUSER", name, "reset", f">{PASSWORD}", *words[1:])


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    tmp = tmp_path_factory.mktemp("tls-redis")
    certs = shapes.make_certs(tmp / "certs")
    (port,) = free_ports(1)
    deployment = shapes.Deployment(tmp)
    deployment.start(port, *shapes.server_args(port, tmp, *shapes.tls_args(certs, port)))
    try:
        kwargs = shapes.tls_client_kwargs(certs)
        shapes.wait_until(lambda: shapes.ping(port, **kwargs), "redis-server with TLS up")
        server = TlsRedis(port, certs)
        server.set_user(USER, acl_rule(USER, "egw-"))
        yield server
    finally:
        deployment.stop()


def options(server: TlsRedis, **tls: object) -> RedisOptions:
    return RedisOptions(
        password=PASSWORD,
        username=USER,
        key_prefix=f"egw-{uuid.uuid4().hex[:8]}:",
        timeout_seconds=2.0,
        tls=server.tls(**tls),
    )


@pytest.fixture
async def tls_store(tls_redis: TlsRedis) -> AsyncIterator[RedisTokenStore]:
    opts = options(tls_redis)
    client = open_redis(tls_redis.url(), opts)
    await check_access(client, opts.key_prefix)
    store = RedisTokenStore(client, key_prefix=opts.key_prefix, owns_client=True)
    yield store
    await store.close()


async def test_tls_with_a_ca_file_a_client_certificate_and_a_server_name(
    tls_store: RedisTokenStore,
) -> None:
    record = TokenRecord(id="tls000000001", name="svc", secret_hash=hash_secret("s"), scopes=("*",))
    await tls_store.put(record)
    assert await tls_store.get(record.id) == record


@pytest.mark.parametrize(
    ("tls", "works"),
    [
        ({"ca_file": "other"}, False),  # the server's certificate is not the CA's we trust
        ({"server_name": None}, False),  # 127.0.0.1 is not on the certificate
        ({"server_name": None, "check_hostname": False}, True),
        ({"server_name": "wrong.test"}, False),
    ],
)
async def test_what_tls_checks(tls_redis: TlsRedis, tls: dict[str, object], works: bool) -> None:
    if tls.get("ca_file") == "other":
        tls = {**tls, "ca_file": str(tls_redis.certs.other_ca)}
    opts = options(tls_redis, **tls)
    client = open_redis(tls_redis.url(), opts)
    try:
        if works:
            await check_access(client, opts.key_prefix)
        else:  # a configuration error named at start-up, not an outage
            with pytest.raises(StateAccessError, match=r"^state: TLS to Redis failed"):
                await check_access(client, opts.key_prefix)
    finally:
        await client.aclose()


@pytest.mark.parametrize("missing", ["time", "evalsha", "subscribe", "watch"])
async def test_a_missing_permission_is_named_at_start(tls_redis: TlsRedis, missing: str) -> None:
    rule = acl_rule("lacking", "egw-").replace(f" +{missing}", "")
    tls_redis.set_user("lacking", rule)
    opts = RedisOptions(
        password=PASSWORD,
        username="lacking",
        key_prefix="egw-lack:",
        timeout_seconds=2.0,
        tls=tls_redis.tls(),
    )
    client = open_redis(tls_redis.url(), opts)
    try:
        with pytest.raises(StateAccessError, match="may not run") as refused:
            await check_access(client, opts.key_prefix)
    finally:
        await client.aclose()
    assert missing in str(refused.value).lower()
    assert PASSWORD not in str(refused.value)


async def test_a_permission_lost_while_running_is_logged_as_an_error_naming_it(
    tls_redis: TlsRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """The ACL user passed the start-up checks, then an operator took ``+time`` away (the
    reservation script calls TIME): the replica carries on alone, as for an outage, and
    says why at error level."""
    tls_redis.set_user("shrinking", acl_rule("shrinking", "egw-"))
    opts = RedisOptions(
        password=PASSWORD,
        username="shrinking",
        key_prefix=f"egw-{uuid.uuid4().hex[:8]}:",
        timeout_seconds=2.0,
        tls=tls_redis.tls(),
    )
    client = open_redis(tls_redis.url(), opts)
    slots = RedisSlots(
        "default", client, opts.key_prefix, [Limit(5, 10.0)], 0.0, replicas=1, mode="local"
    )
    try:
        await check_access(client, opts.key_prefix)
        assert await slots.take(time.time()) is not None
        tls_redis.set_user("shrinking", acl_rule("shrinking", "egw-").replace(" +time", ""))
        with caplog.at_level(logging.WARNING, logger="echowin_gateway"):
            await slots.take(time.time())  # decided alone, from the share the view leaves
        assert not slots.healthy
        (line,) = [r for r in caplog.records if r.getMessage().startswith("shared state")]
        assert line.levelno == logging.ERROR
        assert line.getMessage() == "shared state refuses a permission"
        fields = line.__dict__["fields"]
        # A script's refused command is not named by Redis; the start-up checks name it.
        assert fields["error"] == "ResponseError"
        assert "can't run this command" in fields["refused"]
        assert PASSWORD not in caplog.text
    finally:
        await slots.close()
        await client.aclose()


def test_serve_stops_at_start_on_a_refused_permission(tls_redis: TlsRedis, tmp_path: Path) -> None:
    tls_redis.set_user("notime", acl_rule("notime", "egw-").replace(" +time", ""))
    port, admin = free_ports(2)
    config = tmp_path / "gateway.yaml"
    tls = tls_redis.tls().model_dump()
    raw = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin}",
        "state": tls_redis.url(),
        "redis": {
            "username": "notime",
            "password": {"env": "REDIS_PASSWORD"},
            "key_prefix": "egw-serve:",
            "tls": tls,
        },
    }
    write_config(config, raw)
    env = child_env(ECHOWIN_API_KEY=REAL_KEY, REDIS_PASSWORD=PASSWORD)
    result = run_cli("serve", "--config", config, env=env)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "state: the Redis user may not run TIME" in errors[0]
    assert PASSWORD not in result.stderr + result.stdout


def test_the_docs_give_the_acl_the_tests_use() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    assert acl_rule("gateway", "egw:") in text


async def test_two_replicas_on_tls_as_the_acl_user_under_load(
    tls_redis: TlsRedis,
    tmp_path: Path,
    spawn: Spawn,
    sim_server: tuple[Simulator, str],
) -> None:
    sim, sim_url = sim_server
    tls = {k: v for k, v in tls_redis.tls().model_dump().items() if v is not None}
    redis = {"username": USER, "password": {"env": "REDIS_PASSWORD"}, "tls": tls}
    replicas = replica_configs(tmp_path, sim_url, tls_redis.url(), 2, redis=redis)
    tokens = await mint(replicas[0], 4, {"REDIS_PASSWORD": PASSWORD})
    await start_all(spawn, replicas, REDIS_PASSWORD=PASSWORD)
    statuses: Counter[int] = Counter()
    until = time.monotonic() + 10.0
    await asyncio.gather(
        *(
            load_loop(replicas[i % 2].url("/api/v1/contacts"), tokens[i % 4], until, statuses)
            for i in range(8)
        )
    )
    assert sim.statuses()[429] == 0
    assert statuses[200] > 0 and statuses[0] == 0, statuses
    arrivals = served_arrivals(sim)
    for n, per in LIMITS:
        assert max_in_any_window(arrivals, per) <= n
