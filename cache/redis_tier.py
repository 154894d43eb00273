"""Redis tier: one value per chunk under a key prefix, shared by every API replica.

Failure policy: Redis is an accelerator, never a dependency. Any backend error
turns the call into a miss (or a dropped write), logs ONE warning per outage,
and marks Redis "down until" a backoff deadline so a dead server doesn't add a
connect timeout to every request; the first call after the deadline probes it
again, and a success logs the recovery.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cache.stats import CacheStats

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_PREFIX = "kvrag:kv:"
_CLEAR_BATCH = 500


class RedisTier:
    name = "redis"

    def __init__(
        self,
        url: str,
        ttl_s: int | None = 7 * 24 * 3600,
        prefix: str = DEFAULT_PREFIX,
        stats: CacheStats | None = None,
        socket_timeout_s: float = 1.0,
        connect_timeout_s: float = 0.5,
        retry_min_s: float = 0.5,
        retry_max_s: float = 15.0,
    ) -> None:
        self.url = url
        self.ttl_s = ttl_s if ttl_s and ttl_s > 0 else None
        self.prefix = prefix
        self.stats = stats if stats is not None else CacheStats()
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        # One immediate retry, on connection errors only, lets a pooled socket
        # that died with a Redis restart reconnect transparently; our own backoff
        # handles real outages. Never on a timeout (a TimeoutError is a ConnectionError to
        # redis-py): a hung server (SIGSTOP) would cost the socket timeout twice per request.
        self.socket_timeout_s = socket_timeout_s
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            socket_keepalive=True,
            retry=Retry(
                NoBackoff(),
                1,
                supported_errors=(redis.ConnectionError,),
                is_retryable=lambda e: not isinstance(e, redis.TimeoutError),
            ),
        )
        self._lock = threading.Lock()
        self._down_until = 0.0  # time.monotonic() deadline; 0 = believed up
        self._backoff_s = retry_min_s
        self._outage = False  # a warning was logged for the current outage

    # -- reads / writes -----------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        # MGET: one round trip for the k chunks of a request. (On Redis Cluster
        # this would become a non-transactional pipeline of GETs.)
        values = self._call("MGET", lambda: self.client.mget([self.prefix + k for k in keys]))
        if values is None:
            self.stats.add(self.name, misses=len(keys))
            return {}
        found = {k: v for k, v in zip(keys, values, strict=True) if v is not None}
        self.stats.add(
            self.name,
            hits=len(found),
            misses=len(keys) - len(found),
            bytes_read=sum(len(v) for v in found.values()),
        )
        return found

    def put(self, key: str, value: bytes) -> None:
        self.put_many({key: value})

    def put_many(self, items: Mapping[str, bytes]) -> None:
        if not items:
            return

        def write() -> None:
            # Each value is ONE `SET key value EX ttl`: atomic, so a reader sees
            # the old value, the new one, or none, never half of one.
            pipe = self.client.pipeline(transaction=False)
            for key, value in items.items():
                pipe.set(self.prefix + key, value, ex=self.ttl_s)
            pipe.execute()

        if self._call("SET", write, ok=True):
            self.stats.add(
                self.name, writes=len(items), bytes_written=sum(len(v) for v in items.values())
            )

    def delete(self, key: str) -> None:
        self._call("UNLINK", lambda: self.client.unlink(self.prefix + key))

    def clear(self) -> None:
        """UNLINK every key under this tier's prefix (SCAN, never FLUSHDB)."""

        def scan_and_unlink() -> None:
            batch: list[bytes] = []
            for key in self.client.scan_iter(match=_glob_escape(self.prefix) + "*", count=1000):
                batch.append(key)
                if len(batch) >= _CLEAR_BATCH:
                    self.client.unlink(*batch)
                    batch.clear()
            if batch:
                self.client.unlink(*batch)

        self._call("SCAN/UNLINK", scan_and_unlink)

    def ttl(self, key: str) -> int | None:
        """Seconds left on `key` (-1: no expiry, -2: absent); None if Redis is down."""
        return self._call("TTL", lambda: self.client.ttl(self.prefix + key))

    # -- health -----------------------------------------------------------------

    def is_up(self) -> bool:
        """Ping (respecting the backoff): True when Redis answers."""
        return bool(self._call("PING", self.client.ping))

    def usage(self) -> dict:
        with self._lock:
            up = not self._outage
        return {"url": _redact(self.url), "prefix": self.prefix, "ttl_s": self.ttl_s, "up": up}

    def close(self) -> None:
        self.client.close()

    def _call(self, what: str, fn: Callable[[], T], ok: T | None = None) -> T | None:
        """Run one Redis operation; None (a miss) if Redis is down or fails."""
        with self._lock:
            if time.monotonic() < self._down_until:
                return None
        try:
            result = fn()
        except (redis.RedisError, OSError, TypeError) as e:
            # TypeError: redis-py's pool can hand one thread a connection that a concurrent
            # failure just tore down (socket None) while the server dies. Still just "down".
            self._mark_down(what, e)
            return None
        self._mark_up()
        return ok if ok is not None else result

    def _mark_down(self, what: str, error: Exception) -> None:
        self.stats.add(self.name, errors=1)
        with self._lock:
            first = not self._outage
            self._outage = True
            self._down_until = time.monotonic() + self._backoff_s
            retry_in = self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, self.retry_max_s)
        if first:
            log.warning(
                "Redis tier %s failed on %s (%s: %s); serving misses, retrying in %.1fs",
                _redact(self.url),
                what,
                type(error).__name__,
                error,
                retry_in,
            )
        else:
            log.debug(
                "Redis still down (%s: %s); next try in %.1fs",
                type(error).__name__,
                error,
                retry_in,
            )
        # Drop pooled sockets so the next probe opens a fresh connection.
        with contextlib.suppress(Exception):  # best effort while the server is gone
            self.client.connection_pool.disconnect()

    def _mark_up(self) -> None:
        with self._lock:
            if not self._outage:
                return
            self._outage = False
            self._down_until = 0.0
            self._backoff_s = self.retry_min_s
        log.warning("Redis tier %s is back", _redact(self.url))  # the outage was a warning too


def _glob_escape(s: str) -> str:
    """Escape SCAN MATCH metacharacters so the prefix matches literally."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))
