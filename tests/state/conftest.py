"""Private Redis deployments shared by the state tests of one session, started on first
use: a Sentinel group and a cluster (tests/state/redis/shapes.py). Tests that kill or
reshape a server start their own instead."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.state.redis import shapes


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[shapes.SentinelGroup]:
    group = shapes.start_sentinel_group(tmp_path_factory.mktemp("sentinel"))
    yield group
    group.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[shapes.Cluster]:
    cluster = shapes.start_cluster(tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()
