"""The shared state on a Redis Cluster (``redis-cluster://``): one slot per credential
(hash tags), freezes heard across nodes, and two gateway replicas under load through a
master's failover. Real clusters of redis-server processes on free ports, made by
``redis-cli --cluster create`` (tests/state/redis/shapes.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from proxy.auth.tokens import TokenRecord
from proxy.budget.windows import Limit
from proxy.config import load_config
from proxy.config.stores import RedisTlsConfig
from proxy.sim import Simulator
from proxy.state.redis.client import RedisOptions, open_redis
from proxy.state.redis.fallback import PROBE_INTERVAL
from proxy.state.redis.preflight import StateAccessError, acl_rule, check_access
from proxy.state.redis.scripts import BudgetKeys
from proxy.state.redis.slots import RedisSlots
from proxy.state.redis.tokens import RedisTokenStore
from tests.procs import Spawn, eventually, load_loop
from tests.state.redis import shapes
from tests.state.redis.test_freezes import freeze_reaches_the_other_replica, replica
from tests.state.redis.test_replicas import (
    mint,
    replica_configs,
    served_arrivals,
    sim_server,
    start_all,
)
from tests.test_budget_e2e import LIMITS, max_in_any_window

__all__ = ["sim_server"]  # the fixture, imported for the tests here


async def _back(source: RedisSlots) -> bool:
    return source.healthy


def test_every_key_of_a_credential_is_in_one_slot() -> None:
    for name in ("default", "acme", "quota:abcdef012345"):
        keys = BudgetKeys("egw:", name, 3, tagged=True)
        every = [*keys.reserve, *keys.snapshot, keys.freezes]
        assert {key_slot(key.encode()) for key in every} == {key_slot(name.encode())}
    untagged = BudgetKeys("egw:", "default", 1)
    assert untagged.sends == "egw:default:sends"  # standalone and Sentinel: names unchanged
    assert len({key_slot(k.encode()) for k in untagged.reserve}) > 1


@pytest.fixture
async def cluster_client(redis_cluster: shapes.Cluster) -> AsyncIterator[RedisCluster]:
    client = open_redis(redis_cluster.url, RedisOptions(timeout_seconds=2.0))
    assert isinstance(client, RedisCluster)
    yield client
    await client.aclose()


async def test_the_token_store_is_one_slot(cluster_client: RedisCluster) -> None:
    store = RedisTokenStore(cluster_client, key_prefix=f"egw-{uuid.uuid4().hex[:8]}:")
    keys = store.keys("abc123abc123", "svc")
    assert len({key_slot(key.encode()) for key in keys}) == 1
    assert all("{tokens}" in key for key in keys)


async def test_a_freeze_reaches_the_other_replica_across_nodes(
    cluster_client: RedisCluster,
) -> None:
    prefix = f"egw-freeze-{uuid.uuid4().hex[:10]}:"
    a, b = replica(cluster_client, prefix), replica(cluster_client, prefix)
    await a.restore()
    await b.restore()
    await freeze_reaches_the_other_replica(a, b)
    await a.close()
    await b.close()


async def test_two_replicas_under_load_through_a_master_failover(
    tmp_path: Path, spawn: Spawn, sim_server: tuple[Simulator, str]
) -> None:
    """Three masters with a replica each; two gateway replicas share the budget under load,
    then the master holding the credential's slot is killed: its replica is promoted, and
    the gateways go on with no upstream 429 and admit again on the new master."""
    sim, sim_url = sim_server
    cluster = shapes.start_cluster(tmp_path / "cluster", replicas=1)
    try:
        replicas = replica_configs(tmp_path, sim_url, cluster.url, 2)
        tokens = await mint(replicas[0], 4)
        await start_all(spawn, replicas)
        phases: list[Counter[int]] = [Counter(), Counter(), Counter()]

        async def phase(index: int, seconds: float) -> None:
            until = time.monotonic() + seconds
            await asyncio.gather(
                *(
                    load_loop(replicas[i % 2].url("/api/v1/contacts"), tokens[i % 4], until,
                              phases[index])
                    for i in range(8)
                )
            )  # fmt: skip

        await phase(0, 8.0)
        prefix = load_config(replicas[0].config).redis.key_prefix
        owner = cluster.owner_of(f"{prefix}{{default}}:sends")
        load = asyncio.ensure_future(phase(1, 8.0))
        cluster.kill(owner)
        await load
        await eventually(
            lambda: asyncio.to_thread(lambda: owner not in cluster.masters()),
            "a replica promoted",
            10.0,
        )
        await phase(2, 6.0)
        assert sim.statuses()[429] == 0, "the replicas overspent the shared budget"
        arrivals = served_arrivals(sim)
        for n, per in LIMITS:
            assert max_in_any_window(arrivals, per) <= n
        assert phases[0][200] > 0
        assert phases[2][200] > 0, "not admitting again after the promotion"
        assert phases[2][0] == 0, phases
    finally:
        cluster.stop()


@pytest.mark.parametrize(("dropped", "works"), [(None, True), ("cluster|slots", False)])
async def test_the_documented_acl_on_every_node(
    redis_cluster: shapes.Cluster, dropped: str | None, works: bool
) -> None:
    """The ACL of docs/operations.md, set on every node, is all a cluster client needs;
    without ``+cluster|slots`` the gateway stops at start naming it."""
    user = f"gw{uuid.uuid4().hex[:6]}"
    rule = acl_rule(user, "egw-acl:")
    if dropped is not None:
        rule = rule.replace(f" +{dropped}", "")
    for port in redis_cluster.ports:
        with shapes.client(port) as c:
            c.execute_command("ACL", "SETUSER", user, "reset", ">acl-pass", *rule.split()[1:])
    options = RedisOptions(username=user, password="acl-pass", timeout_seconds=2.0)
    client = open_redis(redis_cluster.url, options)
    try:
        if works:
            await check_access(client, "egw-acl:")
        else:
            with pytest.raises(StateAccessError, match="CLUSTER SLOTS"):
                await check_access(client, "egw-acl:")
    finally:
        await client.aclose()


async def test_a_whole_cluster_down_is_an_outage_not_a_crash(tmp_path: Path) -> None:
    """Every node gone: the client's own errors (finding no node is not a RedisError) are
    read as Redis away: the slots decide alone (on_state_failure: local), nothing is raised
    to the caller, and the probe carries on until the cluster is back."""
    cluster = shapes.start_cluster(tmp_path / "cluster")
    client = open_redis(cluster.url, RedisOptions(timeout_seconds=0.3))
    source = RedisSlots("default", client, "egw-down:", (Limit(10, 60.0),), 0.0,
                        replicas=2, mode="local")  # fmt: skip
    try:
        now = time.time()
        await source.restore(now)
        assert await source.take(now) is not None and source.healthy
        for port in cluster.ports:
            cluster.kill(port)
        await source.take(time.time())  # decided alone (its share of what the view left)
        assert not source.healthy
        await source.refresh(time.time() + 1)  # no exception either
        await asyncio.sleep(2 * PROBE_INTERVAL)  # probes meet a cluster with no node at all
        for port in cluster.ports:
            cluster.restart(port)
        await eventually(lambda: _back(source), "sharing again once the cluster is back", 20.0)
    finally:
        await source.close()
        await client.aclose()
        cluster.stop()


async def test_a_cluster_over_tls(tmp_path: Path) -> None:
    """``rediss-cluster://``: every node TLS only (the cluster bus too), a client
    certificate demanded; the gateway's checks at start and a token's round trip pass."""
    certs = shapes.make_certs(tmp_path / "certs")
    cluster = shapes.start_cluster(tmp_path / "cluster", certs=certs)
    tls = RedisTlsConfig(
        ca_file=str(certs.ca),
        cert_file=str(certs.client_cert),
        key_file=str(certs.client_key),
        check_hostname=False,  # the nodes announce 127.0.0.1; the certificate names redis.test
    )
    url = cluster.url.replace("redis-cluster://", "rediss-cluster://")
    client = open_redis(url, RedisOptions(timeout_seconds=2.0, tls=tls))
    try:
        await check_access(client, "egw-tls:")
        store = RedisTokenStore(client, key_prefix="egw-tls:")
        record = TokenRecord(id="tlsc00000001", name="svc", secret_hash="0" * 64, scopes=("*",))
        await store.put(record)
        assert await store.get(record.id) == record
        other = RedisTlsConfig(ca_file=str(certs.other_ca), check_hostname=False)
        refused = open_redis(url, RedisOptions(timeout_seconds=2.0, tls=other))
        try:
            with pytest.raises(StateAccessError, match="TLS"):
                await check_access(refused, "egw-tls:")
        finally:
            await refused.aclose()
    finally:
        await client.aclose()
        cluster.stop()


async def test_a_wrong_password_on_a_cluster_is_named_at_start(
    redis_cluster: shapes.Cluster,
) -> None:
    user = f"gw{uuid.uuid4().hex[:6]}"
    for port in redis_cluster.ports:
        with shapes.client(port) as c:
            rule = acl_rule(user, "egw-acl:").split()[1:]
            c.execute_command("ACL", "SETUSER", user, "reset", ">right-pass", *rule)
    options = RedisOptions(username=user, password="wrong-pass", timeout_seconds=2.0)
    client = open_redis(redis_cluster.url, options)
    try:
        with pytest.raises(StateAccessError, match="refused the user or password") as refused:
            await check_access(client, "egw-acl:")
        assert "wrong-pass" not in str(refused.value)
    finally:
        await client.aclose()


async def test_a_cluster_down_at_start_is_an_outage_not_an_error(tmp_path: Path) -> None:
    """A master gone with no replica: every node answers CLUSTERDOWN. The gateway's check
    at start warns and lets it start (it runs as on_state_failure says)."""
    cluster = shapes.start_cluster(tmp_path / "cluster")
    client = open_redis(cluster.url, RedisOptions(timeout_seconds=0.5))
    try:
        await client.ping()  # the client knows the slots
        cluster.kill(cluster.ports[0])
        survivor = cluster.ports[1]

        def down() -> bool:
            with shapes.client(survivor) as c:
                return "cluster_state:fail" in c.execute_command("CLUSTER", "INFO").decode()

        shapes.wait_until(down, "the cluster says it is down", 10.0)
        await check_access(client, "egw-down:")
    finally:
        await client.aclose()
        cluster.stop()
