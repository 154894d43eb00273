"""Redis on loopback for tests and benchmarks: one server, or a Redis Cluster built from
`redis-server --cluster-enabled yes` processes and `redis-cli --cluster create`.

Everything lives in a temporary directory and every process is started here and killed
here by pid (also when the block that used them raises). Only 127.0.0.1.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from rag.server.run import free_port


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free too (so P <= 55535)."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randint(20000, 45000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def have_redis_server() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


@dataclass
class Node:
    port: int
    proc: subprocess.Popen | None = None
    args: list[str] | None = None  # how it was started (restart starts it the same way)

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, timeout_s: float = 1.0) -> redis.Redis:
        return redis.Redis(
            port=self.port, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _server_args(port: int, workdir: Path, maxmemory: str | None, policy: str | None) -> list[str]:
    # A cache: no RDB, no AOF. Diskless replication without delay so replicas sync at once.
    args = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(workdir),
        "--save",
        "",
        "--appendonly",
        "no",
        "--repl-diskless-sync",
        "yes",
        "--repl-diskless-sync-delay",
        "0",
        "--repl-ping-replica-period",
        "1",
        "--logfile",
        str(workdir / f"redis-{port}.log"),
    ]
    if maxmemory:
        args += ["--maxmemory", maxmemory, "--maxmemory-policy", policy or "allkeys-lru"]
    return args


def _wait(predicate, timeout_s: float, what: str, step_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if predicate():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(step_s)


def _start(node: Node, args: list[str]) -> None:
    node.args = args
    node.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def answers() -> bool:
        if node.proc.poll() is not None:
            raise RuntimeError(
                f"redis-server on port {node.port} exited with {node.proc.returncode}"
            )
        return bool(node.client(0.2).ping())

    _wait(answers, 10, f"redis-server on port {node.port}", 0.02)


def _kill(node: Node) -> None:
    if node.alive:
        node.proc.kill()  # SIGKILL: no goodbye to connected clients, like a lost machine
        node.proc.wait(timeout=10)


class LocalRedis:
    """One redis-server on a free loopback port (no persistence)."""

    def __init__(self, maxmemory: str | None = None, policy: str | None = None) -> None:
        self.node = Node(free_port())
        self.maxmemory, self.policy = maxmemory, policy
        self._dir: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.node.port}/0"

    def start(self) -> LocalRedis:
        self._dir = Path(tempfile.mkdtemp(prefix="kvrag-redis-"))
        _start(self.node, _server_args(self.node.port, self._dir, self.maxmemory, self.policy))
        return self

    def stop(self) -> None:
        _kill(self.node)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalCluster:
    """`masters` masters with `replicas` replicas each, on free loopback ports.

    cluster-node-timeout is small so a killed master fails over in about two seconds;
    cluster-require-full-coverage is off, as a cache cluster should run: a master lost for
    good takes its own slots down, not the whole cluster.
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 500,
        maxmemory: str | None = None,
        policy: str | None = None,
    ) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.n_masters, self.n_replicas = masters, replicas
        self.node_timeout_ms = node_timeout_ms
        self.maxmemory, self.policy = maxmemory, policy
        self.nodes = [Node(free_cluster_port()) for _ in range(masters * (1 + replicas))]
        self.dir: Path | None = None

    @property
    def url(self) -> str:
        """The KVRAG_REDIS_URL of this cluster: every master as a startup node."""
        return "redis+cluster://" + ",".join(n.name for n in self.nodes[: self.n_masters]) + "/"

    def start(self) -> LocalCluster:
        self.dir = Path(tempfile.mkdtemp(prefix="kvrag-cluster-"))
        try:
            for node in self.nodes:
                args = _server_args(node.port, self.dir, self.maxmemory, self.policy) + [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{node.port}.conf",
                    "--cluster-node-timeout",
                    str(self.node_timeout_ms),
                    "--cluster-require-full-coverage",
                    "no",
                ]
                _start(node, args)
            # The first `masters` addresses become masters, the rest their replicas.
            out = subprocess.run(
                [
                    "redis-cli",
                    "--cluster",
                    "create",
                    *(n.name for n in self.nodes),
                    "--cluster-replicas",
                    str(self.n_replicas),
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if out.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed:\n{out.stdout}\n{out.stderr}"
                )
            self.wait_ok(with_replicas=True)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            _kill(node)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- topology --------------------------------------------------------------

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.alive]

    def masters(self) -> list[Node]:
        """Live nodes that own slots, as the cluster sees it now."""
        owners = self._slot_owners()
        return [n for n in self.live() if n.port in owners]

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def master_of(self, key: str) -> Node:
        slot = self.live()[0].client().execute_command("CLUSTER KEYSLOT", key)
        for start, end, owner, *_ in self.live()[0].client().execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                return self.node(int(owner[1]))
        raise LookupError(f"slot {slot} has no owner")

    def _slot_owners(self) -> set[int]:
        slots = self.live()[0].client().execute_command("CLUSTER SLOTS")
        return {int(owner[1]) for _, _, owner, *_ in slots}

    def wait_ok(self, timeout_s: float = 30, with_replicas: bool = False) -> None:
        """Every live node says cluster_state:ok, all 16384 slots are owned by live masters, and
        every replica's link to its master is up; with_replicas: every master also lists its
        replicas as synced (so a failover can happen)."""

        def settled() -> bool:
            for node in self.live():
                c = node.client()
                if c.cluster("info")["cluster_state"] != "ok":
                    return False
                info = c.info("replication")
                if info["role"] == "slave" and info.get("master_link_status") != "up":
                    return False
            slots = self.live()[0].client().execute_command("CLUSTER SLOTS")
            live_ports = {n.port for n in self.live()}
            covered = sum(
                end - start + 1 for start, end, owner, *_ in slots if int(owner[1]) in live_ports
            )
            synced = all(len(replicas) >= self.n_replicas for _, _, _, *replicas in slots)
            return covered == 16384 and (synced or not with_replicas)

        _wait(settled, timeout_s, "the cluster to settle")

    def kill(self, node: Node) -> None:
        _kill(node)

    def restart(self, node: Node) -> None:
        """Start a killed node again on its port with its nodes.conf: it rejoins in its old role
        (a master without replicas keeps its slots), with no data."""
        assert node.args is not None and not node.alive
        _start(node, node.args)

    def wait_replicated(self, timeout_s: float = 10) -> None:
        """Wait until every replica has acknowledged its master's writes so far."""
        targets = {}
        for node in self.live():
            info = node.client().info("replication")
            if info["role"] == "master":
                targets[node.port] = info["master_repl_offset"]

        def caught_up() -> bool:
            for port, offset in targets.items():
                info = self.node(port).client().info("replication")
                replicas = [
                    v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                ]
                if len(replicas) < self.n_replicas or any(r["offset"] < offset for r in replicas):
                    return False
            return True

        _wait(caught_up, timeout_s, "the replicas to catch up")

    def wait_failover(self, dead: Node, timeout_s: float = 30) -> Node:
        """Wait until a replica took over the dead master's slots; returns the new master."""
        before = self.live()[0].client().execute_command("CLUSTER SLOTS")
        dead_ranges = [(s, e) for s, e, owner, *_ in before if int(owner[1]) == dead.port]

        def promoted() -> bool:
            return dead.port not in self._slot_owners()

        _wait(promoted, timeout_s, f"a replica to take over from {dead.name}")
        self.wait_ok(timeout_s)
        slot = dead_ranges[0][0] if dead_ranges else 0
        for s, e, owner, *_ in self.live()[0].client().execute_command("CLUSTER SLOTS"):
            if s <= slot <= e:
                return self.node(int(owner[1]))
        raise LookupError("no new master found")
