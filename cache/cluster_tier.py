"""Redis Cluster tier: the shared chunk-KV tier sharded over a Redis (or Valkey) Cluster.

Same values and contract as RedisTier: one `SET key value EX ttl` per chunk (checksummed by
cache.serde), misses and dropped writes instead of errors. redis-py's RedisCluster holds the
slot map and one client per node; a batch of keys is grouped by the master owning each key's
hash slot, one pipeline of single-key commands per master (MGET only takes keys of one
slot), and every pipeline is written before any reply is read: the masters serve at once and
a request's chunks cost one round trip, as one MGET does on one server.

Faults are per node. A node that fails (killed, hung, mid-failover) turns only its chunks into
misses and its writes into drops, with one warning per outage; it is then skipped until a
backoff deadline, as RedisTier does for its one server. While any node is out, or a reply says
the slot map is stale (MOVED, CLUSTERDOWN, READONLY, ...), the slot map is re-read (CLUSTER
SLOTS from any live node) on a background thread at most every `refresh_s`, so once a replica
has taken over, its slots are served again without a restart. A write refused for memory
(`noeviction` at maxmemory) is dropped with one warning per node; reads go on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import Connection, ConnectionPool
from redis.exceptions import (
    AskError,
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.retry import Retry

from cache.cluster_url import parse_cluster_url
from cache.redis_tier import _CLEAR_BATCH, DEFAULT_PREFIX, _glob_escape, _redact
from cache.stats import CacheStats

log = logging.getLogger(__name__)

_BOOTSTRAP = "<cluster>"  # the state of reaching any node at all (building the client)
# Replies that mean the client's slot map is stale: re-read it. (MovedError is an AskError.)
_STALE_MAP = (AskError, ClusterDownError, TryAgainError, ReadOnlyError)
_BACKEND_ERRORS = (redis.RedisError, RedisClusterException, OSError, TypeError)


@dataclass
class _NodeHealth:
    backoff_s: float
    down_until: float = 0.0  # time.monotonic() deadline; 0 = believed up
    outage: bool = False  # a warning was logged for the current outage
    refusing: bool = False  # its last write was refused for memory (warned once)
    # False once a refresh found the node no longer owns slots (failed over). Its entry stays,
    # so a stale map read from a lagging node during the failover brings no second warning.
    owns_slots: bool = True


class RedisClusterTier:
    name = "redis"  # the same tier as far as the store, stats and metrics are concerned

    def __init__(
        self,
        url: str,
        ttl_s: int | None = 7 * 24 * 3600,
        prefix: str = DEFAULT_PREFIX,
        stats: CacheStats | None = None,
        socket_timeout_s: float = 2.0,
        connect_timeout_s: float = 0.5,
        retry_min_s: float = 0.5,
        retry_max_s: float = 15.0,
        refresh_s: float = 0.5,
    ) -> None:
        self.url = url
        self.startup_nodes, options = parse_cluster_url(url)  # bad URLs fail here, at start-up
        self.ttl_s = ttl_s if ttl_s and ttl_s > 0 else None
        self.prefix = prefix
        self.stats = stats if stats is not None else CacheStats()
        self.retry_min_s, self.retry_max_s, self.refresh_s = retry_min_s, retry_max_s, refresh_s
        # No retries inside redis-py: a failed node is a miss now and a probe after the backoff.
        self._client_options = {
            **options,
            "socket_timeout": socket_timeout_s,
            "socket_connect_timeout": connect_timeout_s,
            "socket_keepalive": True,
            "require_full_coverage": False,
            "retry": Retry(NoBackoff(), 0),
        }
        self._client: RedisCluster | None = None
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._health: dict[str, _NodeHealth] = {}
        self._refresher = ThreadPoolExecutor(1, thread_name_prefix="kvrag-cluster-refresh")
        self._refresh_pending = False
        self._refresh_after = 0.0

    # -- reads / writes -----------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        keys = list(dict.fromkeys(keys))
        groups = self._by_node(keys)
        found: dict[str, bytes] = {}
        replies = self._send(
            {node: [("GET", self.prefix + k) for k in group] for node, group in groups.items()},
            "GET",
        )
        for node, group in groups.items():
            for key, value in zip(group, replies.get(node) or (), strict=False):
                if isinstance(value, Exception):
                    self._reply_error(node, "GET", value)
                elif value is not None:
                    found[key] = value
        self.stats.add(
            self.name,
            hits=len(found),
            misses=len(keys) - len(found),
            bytes_read=sum(len(v) for v in found.values()),
        )
        return {k: found[k] for k in keys if k in found}

    def put(self, key: str, value: bytes) -> None:
        self.put_many({key: value})

    def put_many(self, items: Mapping[str, bytes]) -> None:
        if not items:
            return
        ex = ("EX", self.ttl_s) if self.ttl_s else ()
        written = 0
        written_bytes = 0
        groups = self._by_node(list(items))
        # One SET per value: atomic, a reader sees the old value, the new one or none.
        sent = self._send(
            {
                node: [("SET", self.prefix + k, items[k], *ex) for k in group]
                for node, group in groups.items()
            },
            "SET",
        )
        for node, group in groups.items():
            replies = sent.get(node)
            if replies is None:
                continue
            refused = 0
            for key, reply in zip(group, replies, strict=True):
                if isinstance(reply, Exception):
                    refused += isinstance(reply, OutOfMemoryError)
                    self._reply_error(node, "SET", reply)
                else:
                    written += 1
                    written_bytes += len(items[key])
            self._note_refusals(node, refused)
        if written:
            self.stats.add(self.name, writes=written, bytes_written=written_bytes)

    def delete(self, key: str) -> None:
        self._send(
            {
                node: [("UNLINK", self.prefix + k) for k in group]
                for node, group in self._by_node([key]).items()
            },
            "UNLINK",
        )

    def clear(self) -> None:
        """UNLINK every key under this tier's prefix on every master (SCAN, never FLUSHALL)."""
        client = self._cluster()
        if client is None:
            return
        pattern = _glob_escape(self.prefix) + "*"
        for node in client.get_primaries():
            if not self._usable(node.name):
                continue
            try:
                batch: list[bytes] = []
                for key in node.redis_connection.scan_iter(match=pattern, count=1000):
                    batch.append(key)
                    if len(batch) >= _CLEAR_BATCH:
                        self._unlink_raw(node.redis_connection, batch)
                        batch.clear()
                self._unlink_raw(node.redis_connection, batch)
            except _BACKEND_ERRORS as e:
                self._mark_down(node.name, "SCAN/UNLINK", e)

    def ttl(self, key: str) -> int | None:
        """Seconds left on `key` (-1: no expiry, -2: absent); None if its node is down."""
        replies = self._send(
            {
                node: [("TTL", self.prefix + k) for k in group]
                for node, group in self._by_node([key]).items()
            },
            "TTL",
        )
        for reply in replies.values():
            if reply and not isinstance(reply[0], Exception):
                return int(reply[0])
        return None

    # -- health -----------------------------------------------------------------

    def is_up(self) -> bool:
        """Ping every master (respecting the backoffs): True when all of them answer."""
        client = self._cluster()
        if client is None:
            return False
        replies = self._send({node: [("PING",)] for node in client.get_primaries()}, "PING")
        return bool(replies) and all(r is not None for r in replies.values())

    def usage(self) -> dict:
        client = self._client
        with self._lock:
            down = sorted(name for name, h in self._health.items() if h.outage and h.owns_slots)
        masters = [n.name for n in client.get_primaries()] if client is not None else []
        return {
            "url": _redact(self.url),
            "prefix": self.prefix,
            "ttl_s": self.ttl_s,
            "up": not down,
            "cluster": True,
            "masters": masters,
            "down": down,
        }

    def close(self) -> None:
        self._refresher.shutdown(wait=True)
        if self._client is not None:
            self._client.close()

    # -- routing ------------------------------------------------------------------

    def _cluster(self) -> RedisCluster | None:
        """The cluster client, built on first use (so a store can be built with no network);
        None while no node can be reached."""
        if self._client is not None:
            return self._client
        if not self._usable(_BOOTSTRAP):
            return None
        with self._connect_lock:
            if self._client is None:
                try:
                    self._client = RedisCluster(
                        startup_nodes=[ClusterNode(h, p) for h, p in self.startup_nodes],
                        **self._client_options,
                    )
                except _BACKEND_ERRORS as e:
                    self._mark_down(_BOOTSTRAP, "connect", e)
                    return None
                self._mark_up(_BOOTSTRAP)
        return self._client

    def _by_node(self, keys: Sequence[str]) -> dict[ClusterNode, list[str]]:
        """Keys grouped by the master that owns their slot; keys of a slot with no owner right
        now are left out (misses)."""
        client = self._cluster()
        if client is None:
            return {}
        with self._lock:
            stale = any(
                h.outage and h.owns_slots for name, h in self._health.items() if name != _BOOTSTRAP
            )
        if stale:
            self._request_refresh()
        groups: dict[ClusterNode, list[str]] = {}
        manager = client.nodes_manager
        for key in keys:
            try:
                node = manager.get_node_from_slot(client.keyslot(self.prefix + key))
            except _BACKEND_ERRORS:  # SlotNotCoveredError: the slot has no owner right now
                self._request_refresh()
                continue
            groups.setdefault(node, []).append(key)
        return groups

    def _send(self, plan: Mapping[ClusterNode, list[tuple]], what: str) -> dict:
        """Run each node's commands as one pipeline. Every node's commands are written before
        any reply is read, so the nodes work in parallel: one round trip in all, not one per
        node. Returns {node: its replies in order (error replies as exception objects), or None
        when the node is down (skipped, or failed now)}."""
        out: dict[ClusterNode, list | None] = dict.fromkeys(plan)
        sent: list[tuple[ClusterNode, ConnectionPool, Connection, int]] = []  # written, unread
        try:
            for node, commands in plan.items():
                if node.redis_connection is None or not self._usable(node.name):
                    continue
                pool, conn = node.redis_connection.connection_pool, None
                try:
                    conn = pool.get_connection()
                    conn.send_packed_command(conn.pack_commands(commands))
                except _BACKEND_ERRORS as e:
                    if conn is not None:
                        _discard(pool, conn)
                    self._mark_down(node.name, what, e)
                    continue
                sent.append((node, pool, conn, len(commands)))
            while sent:
                node, pool, conn, n = sent[0]
                try:
                    replies = [_read_reply(conn) for _ in range(n)]
                except _BACKEND_ERRORS as e:
                    # TypeError: redis-py can hand one thread a connection that a concurrent
                    # failure just tore down (socket None) while the node dies. Still "down".
                    del sent[0]
                    _discard(pool, conn)
                    self._mark_down(node.name, what, e)
                    continue
                del sent[0]
                pool.release(conn)
                self._mark_up(node.name)
                out[node] = replies
        finally:
            for _node, pool, conn, _n in sent:  # interrupted: no half-read socket back to a pool
                _discard(pool, conn)
        return out

    def _unlink_raw(self, node_client: redis.Redis, raw_keys: list[bytes]) -> None:
        # One UNLINK per key: a multi-key UNLINK must stay within one slot.
        if raw_keys:
            pipe = node_client.pipeline(transaction=False)
            for k in raw_keys:
                pipe.unlink(k)
            pipe.execute(raise_on_error=False)

    # -- node health ----------------------------------------------------------------

    def _usable(self, name: str) -> bool:
        with self._lock:
            h = self._health.get(name)
            return h is None or time.monotonic() >= h.down_until

    def _mark_down(self, name: str, what: str, error: BaseException) -> None:
        self.stats.add(self.name, errors=1)
        with self._lock:
            h = self._health.setdefault(name, _NodeHealth(self.retry_min_s))
            first = not h.outage
            h.outage = True
            h.down_until = time.monotonic() + h.backoff_s
            retry_in = h.backoff_s
            h.backoff_s = min(h.backoff_s * 2, self.retry_max_s)
        where = "no node reachable" if name == _BOOTSTRAP else f"node {name}"
        if first:
            log.warning(
                "Redis Cluster tier %s: %s failed on %s (%s: %s); its chunks are misses, "
                "retrying in %.1fs",
                _redact(self.url),
                where,
                what,
                type(error).__name__,
                error,
                retry_in,
            )
        else:
            log.debug(
                "Redis Cluster %s still down (%s: %s); next try in %.1fs",
                where,
                type(error).__name__,
                error,
                retry_in,
            )
        if name != _BOOTSTRAP:
            self._drop_connections(name)
            self._request_refresh()

    def _mark_up(self, name: str) -> None:
        with self._lock:
            h = self._health.get(name)
            if h is None or not h.outage:
                return
            h.outage, h.down_until, h.backoff_s = False, 0.0, self.retry_min_s
        log.warning(
            "Redis Cluster tier %s: %s is back",
            _redact(self.url),
            "the cluster" if name == _BOOTSTRAP else f"node {name}",
        )

    def _reply_error(self, node: ClusterNode, what: str, error: Exception) -> None:
        """An error reply for one command (the node itself answered): a miss or a dropped write."""
        self.stats.add(self.name, errors=1)
        if isinstance(error, _STALE_MAP):
            log.debug("Redis Cluster %s on %s: %s; re-reading the slot map", what, node.name, error)
            self._request_refresh()
        elif not isinstance(error, OutOfMemoryError):
            log.debug("Redis Cluster %s on %s: %s", what, node.name, error)

    def _note_refusals(self, node: ClusterNode, refused: int) -> None:
        with self._lock:
            h = self._health.setdefault(node.name, _NodeHealth(self.retry_min_s))
            changed, h.refusing = h.refusing != bool(refused), bool(refused)
        if changed and refused:
            log.warning(
                "Redis Cluster node %s refuses writes (maxmemory with noeviction): chunks "
                "it owns are not stored; reads go on",
                node.name,
            )
        elif changed:
            log.info("Redis Cluster node %s accepts writes again", node.name)

    def _drop_connections(self, name: str) -> None:
        client = self._client
        node = client.get_node(node_name=name) if client is not None else None
        if node is not None and node.redis_connection is not None:
            with contextlib.suppress(Exception):  # best effort while the node is gone
                node.redis_connection.connection_pool.disconnect()

    # -- topology -----------------------------------------------------------------

    def _request_refresh(self) -> None:
        """Re-read the slot map on the background thread, at most once per refresh_s."""
        with self._lock:
            now = time.monotonic()
            if self._refresh_pending or now < self._refresh_after or self._client is None:
                return
            self._refresh_pending = True
            self._refresh_after = now + self.refresh_s
        try:
            self._refresher.submit(self._refresh)
        except RuntimeError:  # shut down
            self._refresh_pending = False

    def _refresh(self) -> None:
        client = self._client
        try:
            assert client is not None
            before = {n.name for n in client.get_primaries()}
            client.nodes_manager.initialize()
            after = {n.name for n in client.get_primaries()}
        except _BACKEND_ERRORS as e:
            log.debug("Redis Cluster slot map refresh failed: %s", e)
            return
        finally:
            with self._lock:
                self._refresh_pending = False
        if before != after:
            log.info(
                "Redis Cluster tier %s: masters now %s (were %s)",
                _redact(self.url),
                ", ".join(sorted(after)),
                ", ".join(sorted(before)),
            )
        replaced = []
        with self._lock:
            for name, h in self._health.items():
                owns = name in after or name == _BOOTSTRAP
                if h.outage and h.owns_slots and not owns:
                    replaced.append(name)
                h.owns_slots = owns
        for name in replaced:
            log.info(
                "Redis Cluster tier %s: node %s no longer owns slots (failed over); its "
                "chunks are served by the new masters",
                _redact(self.url),
                name,
            )


def _read_reply(conn: Connection) -> Any:
    try:
        return conn.read_response()
    except ResponseError as e:  # one command's error reply: the others stand
        return e


def _discard(pool: ConnectionPool, conn: Connection) -> None:
    with contextlib.suppress(Exception):  # best effort: the socket may already be gone
        conn.disconnect()
    pool.release(conn)
