"""Private Redis deployments for tests, on free loopback ports: a TLS server (with a CA and
certificates made by the openssl command), a Sentinel group (a master, a replica, three
sentinels) and a cluster (three masters, optionally one replica each).

Every wait is bounded; a binary that is missing or a server that does not come up FAILS
the test (never skips it), in CI and out. Each deployment kills its processes on ``stop``.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.procs import free_ports

UP_SECONDS = 20.0


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (make test-deps installs it)", pytrace=False)
    return path


def wait_until(cond: Callable[[], bool], what: str, timeout: float = UP_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s", pytrace=False)
        time.sleep(0.05)


def client(port: int, **kwargs: object) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1, **kwargs
    )


def ping(port: int, **kwargs: object) -> bool:
    with client(port, **kwargs) as c:
        return bool(c.ping())


@dataclass
class Deployment:
    """Processes started for one test (or session); ``stop`` kills what still runs."""

    tmp: Path
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    started: dict[int, tuple[str, ...]] = field(default_factory=dict)
    # Prefixes each command line (say taskset, to pin a benchmark's servers to a CPU).
    wrap: Callable[[list[str]], list[str]] = list

    def start(self, port: int, *args: str, program: str = "redis-server") -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.started[port] = (program, *args)
        log = (self.tmp / f"{program}-{port}.log").open("wb")
        self.procs[port] = subprocess.Popen(
            self.wrap([binary(program), *args]), stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp
        )
        log.close()

    def restart(self, port: int) -> None:
        """Start the process on ``port`` again, as it was (a cluster node keeps its config)."""
        program, *args = self.started[port]
        self.start(port, *args, program=program)

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in self.tmp.glob("*.log"))


def server_args(port: int, tmp: Path, *extra: str) -> list[str]:
    """A throwaway server: loopback only, no persistence, its files under ``tmp``."""
    return [
        "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(tmp), "--dbfilename", f"dump-{port}.rdb", *extra,
    ]  # fmt: skip


# --- TLS -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # signs nothing here: a client trusting it must refuse the server


def _openssl(tmp: Path, *args: str) -> None:
    subprocess.run([binary("openssl"), *args], cwd=tmp, check=True, capture_output=True, timeout=30)


def _ca(tmp: Path, name: str) -> None:
    _openssl(
        tmp, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
        "-subj", f"/CN={name}",
    )  # fmt: skip


def _signed(tmp: Path, name: str, san: str) -> None:
    _openssl(
        tmp, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
    )  # fmt: skip
    (tmp / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl(
        tmp, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
    )  # fmt: skip


def make_certs(tmp: Path) -> Certs:
    """A CA, a server certificate for the name ``redis.test`` only (not 127.0.0.1: a client
    must be told the name), a client certificate, and an unrelated CA."""
    tmp.mkdir(parents=True, exist_ok=True)
    _ca(tmp, "ca")
    _ca(tmp, "other-ca")
    _signed(tmp, "server", "DNS:redis.test")
    _signed(tmp, "client", "DNS:gateway.test")
    return Certs(
        tmp / "ca.pem",
        tmp / "server.pem",
        tmp / "server.key",
        tmp / "client.pem",
        tmp / "client.key",
        tmp / "other-ca.pem",
    )


def tls_args(certs: Certs, port: int) -> list[str]:
    """A server that speaks TLS only (``port``) and demands a client certificate."""
    return [
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(certs.server_cert),
        "--tls-key-file", str(certs.server_key), "--tls-ca-cert-file", str(certs.ca),
        "--tls-auth-clients", "yes",
    ]  # fmt: skip


def tls_client_kwargs(certs: Certs) -> dict[str, object]:
    return {
        "ssl": True,
        "ssl_ca_certs": str(certs.ca),
        "ssl_certfile": str(certs.client_cert),
        "ssl_keyfile": str(certs.client_key),
        "ssl_check_hostname": False,
    }


# --- Sentinel --------------------------------------------------------------------------


SERVICE = "egw-master"


@dataclass
class SentinelGroup(Deployment):
    master: int = 0
    replica: int = 0
    sentinels: tuple[int, ...] = ()
    tls: dict[str, object] = field(default_factory=dict)  # how a test client reaches them
    sentinel_auth: dict[str, object] = field(default_factory=dict)  # the sentinels' AUTH

    @property
    def url(self) -> str:
        nodes = ",".join(f"127.0.0.1:{p}" for p in self.sentinels)
        return f"redis-sentinel://{nodes}/{SERVICE}"

    def master_port(self) -> int:
        """The master's port as the sentinels tell it now."""
        with client(self.sentinels[0], **self.tls, **self.sentinel_auth) as c:
            _host, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(port)


def start_sentinel_group(
    tmp: Path,
    through: Callable[[int], int] | None = None,
    certs: Certs | None = None,
    sentinel_password: str | None = None,
) -> SentinelGroup:
    """A master, its replica and three sentinels (quorum 2) that fail over after 1 s down.
    ``through(master_port)``: the port everyone reaches the master at instead (a Gate's):
    the replica replicates from it, the sentinels monitor it (``group.master`` is it).
    ``certs``: every server and sentinel TLS only (replication and sentinels' own links
    too), a client certificate demanded. ``sentinel_password``: the sentinels demand it
    (``requirepass``, and use it among themselves); the servers do not."""
    master, replica, *sentinels = free_ports(5)
    tmp.mkdir(parents=True, exist_ok=True)
    upstream = master if through is None else through(master)
    group = SentinelGroup(tmp, master=upstream, replica=replica, sentinels=tuple(sentinels))
    tls = {} if certs is None else tls_client_kwargs(certs)
    group.tls = tls
    auth = (
        ""
        if sentinel_password is None
        else (f"requirepass {sentinel_password}\nsentinel sentinel-pass {sentinel_password}\n")
    )
    group.sentinel_auth = {} if sentinel_password is None else {"password": sentinel_password}

    def secure(port: int) -> list[str]:
        return [] if certs is None else [*tls_args(certs, port), "--tls-replication", "yes"]

    try:
        group.start(master, *server_args(master, tmp, *secure(master)))
        replicaof = ["--replicaof", "127.0.0.1", str(upstream)]
        group.start(replica, *server_args(replica, tmp, *replicaof, *secure(replica)))
        for port in sentinels:
            conf = tmp / f"sentinel-{port}.conf"
            listen = f"port {port}\n" if certs is None else _sentinel_tls(certs, port)
            conf.write_text(
                f"{listen}bind 127.0.0.1\ndir {tmp}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {upstream} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 4000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n{auth}"
            )
            group.start(port, str(conf), "--sentinel")
        wait_until(lambda: _replicating(replica, **tls), "the replica in sync")
        for port in sentinels:
            wait_until(
                lambda p=port: _sentinel_sees_all(p, **tls, **group.sentinel_auth),
                f"sentinel {port} up",
            )
    except BaseException:
        group.stop()
        raise
    return group


def _sentinel_tls(certs: Certs, port: int) -> str:
    return (
        f"port 0\ntls-port {port}\ntls-cert-file {certs.server_cert}\n"
        f"tls-key-file {certs.server_key}\ntls-ca-cert-file {certs.ca}\n"
        "tls-auth-clients yes\ntls-replication yes\n"
    )


def _replicating(port: int, **kwargs: object) -> bool:
    with client(port, **kwargs) as c:
        return c.info("replication").get("master_link_status") == "up"


def _sentinel_sees_all(port: int, **kwargs: object) -> bool:
    with client(port, **kwargs) as c:
        master = c.sentinel_master(SERVICE)
        return int(master["num-other-sentinels"]) >= 2 and int(master["num-slaves"]) >= 1


# --- Cluster ---------------------------------------------------------------------------


@dataclass
class Cluster(Deployment):
    ports: tuple[int, ...] = ()

    @property
    def url(self) -> str:
        return "redis-cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3])

    def live(self) -> int:
        """A node still running (to ask about the others)."""
        return next(p for p in self.ports if self.procs[p].poll() is None)

    def owner_of(self, key: str) -> int:
        """The port of the master that holds ``key``'s slot now."""
        with client(self.live()) as c:
            slot = c.execute_command("CLUSTER", "KEYSLOT", key)
            for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        raise AssertionError(f"no master for slot {slot}")

    def masters(self) -> list[int]:
        """The masters a live node counts (a failed one is left out)."""
        with client(self.live()) as c:
            nodes = c.execute_command("CLUSTER", "NODES").decode()
        return [
            int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
            for line in nodes.splitlines()
            if "master" in line.split()[2] and "fail" not in line.split()[2]
        ]


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(n: int) -> tuple[int, ...]:
    """``n`` free ports a cluster node can take: at most 55535, and the bus port 10000 above
    each free too, none of them another node's port or bus port (a node on 38001 binds
    48001 for its bus: a second node given 48001 could not start)."""
    found: list[int] = []
    taken: set[int] = set()
    for _ in range(200):
        for p in free_ports(8):
            if p <= 55535 and not {p, p + 10000} & taken and _bindable(p + 10000):
                found.append(p)
                taken.update((p, p + 10000))
        if len(found) >= n:
            return tuple(found[:n])
    pytest.fail("no free ports for a cluster", pytrace=False)


def start_cluster(
    tmp: Path,
    *,
    replicas: int = 0,
    certs: Certs | None = None,
    wrap: Callable[[list[str]], list[str]] = list,
) -> Cluster:
    """Three masters (and ``replicas`` replicas each) joined by ``redis-cli --cluster
    create``; a master down 1 s is failed over to its replica. ``certs``: TLS only, on
    the clients' ports and the cluster bus alike (a client certificate demanded).
    ``wrap``: prefixes each node's command line (tests/bench/replicas.py pins the nodes)."""
    ports = cluster_ports(3 * (1 + replicas))
    cluster = Cluster(tmp, wrap=wrap, ports=ports)
    tls = {} if certs is None else tls_client_kwargs(certs)
    try:
        for port in ports:
            extra = [] if certs is None else tls_args(certs, port)
            extra += [] if certs is None else ["--tls-cluster", "yes", "--tls-replication", "yes"]
            cluster.start(
                port,
                *server_args(port, tmp, "--cluster-enabled", "yes", *extra),
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "1000",
            )  # fmt: skip
        for port in ports:
            wait_until(lambda p=port: ping(p, **tls), f"cluster node {port} up")
        create = [binary("redis-cli")]
        if certs is not None:
            create += ["--tls", "--cacert", str(certs.ca), "--cert", str(certs.client_cert)]
            create += ["--key", str(certs.client_key)]
        create += ["--cluster", "create", *(f"127.0.0.1:{p}" for p in ports)]
        create += ["--cluster-replicas", str(replicas), "--cluster-yes"]
        done = subprocess.run(create, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed: {done.stdout}{done.stderr}")
        for port in ports:
            wait_until(lambda p=port: _cluster_ok(p, **tls), f"cluster node {port} ok")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _cluster_ok(port: int, **kwargs: object) -> bool:
    with client(port, **kwargs) as c:
        info = c.execute_command("CLUSTER", "INFO").decode()
        return "cluster_state:ok" in info and "cluster_slots_assigned:16384" in info
