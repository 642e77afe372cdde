"""A real three-master Redis Cluster on loopback, started once per test session.

Tests import the fixtures by name: ``redis_cluster`` (the session's cluster) and
``redis_cluster_url`` (a node's URL, with a key prefix of the test's own in
ENCORE_REDIS_PREFIX and ENCORE_REDIS_CLUSTER=true). Without redis-server or redis-cli the
tests skip with the reason; under CI=true they fail.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import IN_CI


def _free_cluster_port() -> int:
    """A free port P with P + 10000 free too: the cluster bus listens there (P <= 55535)."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        try:
            with socket.socket() as probe, socket.socket() as bus:
                probe.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10000))
                return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisClusterServers:
    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.directory = directory
        self.ports = [_free_cluster_port() for _ in range(masters)]
        self.processes: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, *, timeout_seconds: float = 30.0) -> None:
        for port in self.ports:
            self.processes.append(
                subprocess.Popen(
                    [
                        "redis-server",
                        "--port", str(port),
                        "--bind", "127.0.0.1",
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", str(self.directory / f"nodes-{port}.conf"),
                        "--dir", str(self.directory),
                        "--save", "",
                        "--appendonly", "no",
                        "--daemonize", "no",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        deadline = time.monotonic() + timeout_seconds
        for port in self.ports:
            self._wait(lambda p=port: self._cli(p, "ping") == "PONG", deadline, f"node {port}")
        create = subprocess.run(
            ["redis-cli", "--cluster", "create"]
            + [f"127.0.0.1:{port}" for port in self.ports]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=timeout_seconds,
        )
        assert create.returncode == 0, f"redis-cli --cluster create: {create.stdout[-2000:]}"
        for port in self.ports:
            self._wait(
                lambda p=port: "cluster_state:ok" in self._cli(p, "cluster", "info"),
                deadline,
                f"cluster_state:ok on {port}",
            )

    def _cli(self, port: int, *args: str) -> str:
        answer = subprocess.run(
            ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=5
        )
        return answer.stdout.strip()

    def _wait(self, ready, deadline: float, what: str) -> None:
        while not ready():
            for process in self.processes:
                assert process.poll() is None, "a redis-server of the cluster exited"
            assert time.monotonic() < deadline, f"the Redis Cluster never got {what}"
            time.sleep(0.05)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=20)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    missing = [tool for tool in ("redis-server", "redis-cli") if shutil.which(tool) is None]
    servers = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
    try:
        if missing:
            raise RuntimeError(f"{' and '.join(missing)} not installed (apt-get install redis)")
        servers.start()
    except (AssertionError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
        servers.close()
        message = f"cannot start a Redis Cluster: {exc}"
        if IN_CI:
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)
    try:
        yield servers
    finally:
        servers.close()


@pytest.fixture
def redis_cluster_url(
    redis_cluster: RedisClusterServers, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A node of the cluster, with a key prefix of this test's own (removed afterwards)."""
    from redis.cluster import RedisCluster

    from encore.settings import get_settings

    prefix = f"encore-test-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("ENCORE_REDIS_PREFIX", prefix)
    monkeypatch.setenv("ENCORE_REDIS_CLUSTER", "true")
    get_settings.cache_clear()
    yield redis_cluster.url
    with RedisCluster.from_url(redis_cluster.url) as client:
        for pattern in (f"{prefix}:*", f"{{{prefix}}}:*"):
            for key in list(client.scan_iter(pattern, count=1000)):
                client.unlink(key)
