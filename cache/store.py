"""TieredStore: memory -> Redis -> disk, fronted by one get/put API.

Reads walk the tiers top-down and stop at the first hit; a hit in a lower tier
is promoted upward (memory synchronously, subject to the request's admission
budget; byte tiers on a background writer so a read never pays for a write).
Writes go through to every tier. A value that fails verification in any tier
is a miss: it is deleted there and counted as corrupt.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from cache.entry import ChunkKV
from cache.memory_tier import MemoryTier
from cache.request import StoreRequest
from cache.serde import CorruptEntry, dumps, loads
from cache.stats import CacheStats
from cache.tier import ByteTier

log = logging.getLogger(__name__)


class TieredStore:
    """Chunk-KV store over up to three tiers. Thread-safe.

    `fingerprint` is the model fingerprint written into every value and required
    on read (a value from another model is corrupt, not a hit). Returned entries
    are on `device`; treat them as read-only (see ChunkKV).
    """

    def __init__(
        self,
        memory: MemoryTier | None = None,
        redis: ByteTier | None = None,
        disk: ByteTier | None = None,
        fingerprint: str = "",
        device: torch.device | str = "cpu",
        max_new_per_request: int | None = None,
        stats: CacheStats | None = None,
        prefetch_workers: int = 2,
        stats_path: Path | None = None,
    ) -> None:
        self.memory = memory
        self.redis = redis
        self.disk = disk
        self.fingerprint = fingerprint
        self.device = torch.device(device)
        self.max_new_per_request = max_new_per_request
        # The store owns the counters: its tiers all report into them.
        self._stats = stats if stats is not None else CacheStats()
        self.stats_path = stats_path  # running totals across processes (persist_stats)
        self._persisted_at = float("-inf")
        self._persist_warned = False
        self._byte_tiers: list[ByteTier] = [t for t in (redis, disk) if t is not None]
        for tier in (memory, *self._byte_tiers):
            if tier is not None:
                tier.stats = self._stats
                self._stats.add(tier.name)  # listed (at zero) before any traffic
        self._prefetcher = ThreadPoolExecutor(prefetch_workers, thread_name_prefix="kvrag-prefetch")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kvrag-promote")
        self._pending: set[Future] = set()
        self._pending_lock = threading.Lock()

    # -- requests -------------------------------------------------------------

    def begin_request(self, max_new: int | None = None) -> StoreRequest:
        """One request's admissions and counts, shared across its calls (get_many, prefetch,
        stream, put_many); max_new defaults to max_new_per_request."""
        return StoreRequest(self.max_new_per_request if max_new is None else max_new)

    # -- reads ----------------------------------------------------------------

    def get_many(
        self, keys: Sequence[str], request: StoreRequest | None = None
    ) -> dict[str, ChunkKV]:
        """Entries for the keys found in any tier, in request order; misses are absent.

        Without `request`, this call is its own request.
        """
        start = time.perf_counter()
        request = request if request is not None else self.begin_request()
        wanted = list(dict.fromkeys(keys))
        found: dict[str, ChunkKV] = {}
        if self.memory is not None:
            found.update(self.memory.get_many(wanted))
            request.record(self.memory.name, len(found), len(wanted) - len(found))
        missing = [k for k in wanted if k not in found]
        above: list[ByteTier] = []  # byte tiers already missed, to promote into
        for tier in self._byte_tiers:
            if not missing:
                break
            for key, data in tier.get_many(missing).items():
                try:
                    entry = loads(data, self.fingerprint, expected_key=key)
                except CorruptEntry as e:
                    self._drop_corrupt(tier, key, e)
                    continue
                if above:
                    self._promote(above, key, data)
                found[key] = self._admit(key, entry, request)
            still = [k for k in missing if k not in found]
            request.record(tier.name, len(missing) - len(still), len(still))
            above.append(tier)
            missing = still
        self._stats.record_load((time.perf_counter() - start) * 1000, len(wanted))
        return {k: found[k] for k in wanted if k in found}

    def get(self, key: str, request: StoreRequest | None = None) -> ChunkKV | None:
        return self.get_many([key], request).get(key)

    def prefetch(self, keys: Iterable[str], request: StoreRequest | None = None) -> Future:
        """Start get_many on a background thread; the Future yields its dict."""
        return self._prefetcher.submit(self.get_many, list(keys), request)

    def stream(self, keys: Sequence[str], request: StoreRequest) -> Iterator[ChunkKV | None]:
        """Start loading every key now; yield each entry (None: a miss) in order as it lands.

        Two reads, submitted before the first yield: the first key alone (it lands first, and
        the caller can use it while the rest load) and the others in one batch (one MGET, not
        k GETs). A failed load is a miss. `request.wait_ms` adds up the time blocked here.
        """
        loads = [self.prefetch(keys[:1], request)] if keys else []
        if len(keys) > 1:
            loads += [self.prefetch(keys[1:], request)] * (len(keys) - 1)

        def entries() -> Iterator[ChunkKV | None]:
            for key, load in zip(keys, loads, strict=True):
                t0 = time.perf_counter()
                try:
                    entry = load.result().get(key)
                except Exception:  # a store failure must never fail the request
                    log.warning("chunk K/V load failed; served as a miss", exc_info=True)
                    entry = None
                request.wait_ms += 1000 * (time.perf_counter() - t0)
                yield entry

        return entries()

    # -- writes ---------------------------------------------------------------

    def put_many(self, entries: Mapping[str, ChunkKV], request: StoreRequest | None = None) -> None:
        """Write through to every tier (serialized once for the byte tiers)."""
        if not entries:
            return
        request = request if request is not None else self.begin_request()
        if self._byte_tiers:
            values = {key: dumps(entry, self.fingerprint, key) for key, entry in entries.items()}
            for tier in self._byte_tiers:
                tier.put_many(values)
        if self.memory is not None:
            for key, entry in entries.items():
                # Replacing a resident entry is not a new admission.
                if key in self.memory or request.take():
                    self.memory.put(key, entry)

    def put(self, key: str, entry: ChunkKV, request: StoreRequest | None = None) -> None:
        self.put_many({key: entry}, request)

    def delete(self, key: str) -> None:
        for tier in self._all_tiers():
            tier.delete(key)

    def clear(self) -> None:
        """Empty every tier (Redis: only keys under its prefix)."""
        self.flush()
        for tier in self._all_tiers():
            tier.clear()

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait for background promotions to finish (tests, shutdown)."""
        with self._pending_lock:
            pending = list(self._pending)
        for future in pending:
            future.result(timeout=timeout_s)

    # -- introspection --------------------------------------------------------

    def stats(self) -> dict:
        snap = self._stats.snapshot()
        snap["usage"] = {tier.name: tier.usage() for tier in self._all_tiers()}
        return snap

    @property
    def tier_names(self) -> list[str]:
        return [tier.name for tier in self._all_tiers()]

    def persist_stats(self, min_interval_s: float = 0.0) -> dict | None:
        """Add this store's counts since the last call to the totals at stats_path (if set),
        unless the last call was less than min_interval_s ago (a busy server writes the file
        every few seconds, not per request)."""
        now = time.monotonic()
        if self.stats_path is None or now - self._persisted_at < min_interval_s:
            return None
        self._persisted_at = now
        try:
            return self._stats.persist(self.stats_path)
        except OSError as e:  # bookkeeping never fails an answer (e.g. a read-only data dir)
            if not self._persist_warned:
                self._persist_warned = True
                log.warning(
                    "cannot write cache stats to %s (%s); counting in memory only",
                    self.stats_path,
                    e,
                )
            return None

    def close(self) -> None:
        self._prefetcher.shutdown(wait=True)
        self.flush()
        self.persist_stats()
        self._writer.shutdown(wait=True)
        for tier in self._all_tiers():
            tier.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------

    def _all_tiers(self) -> list:
        return [t for t in (self.memory, *self._byte_tiers) if t is not None]

    def _admit(self, key: str, entry: ChunkKV, request: StoreRequest) -> ChunkKV:
        if self.memory is not None and request.take():
            stored = self.memory.put(key, entry)
            if stored is not None:
                return stored
        return entry.to(self.device)

    def _promote(self, tiers: list[ByteTier], key: str, data: bytes | bytearray) -> None:
        def write() -> None:
            for tier in tiers:
                tier.put(key, data)

        future = self._writer.submit(write)
        with self._pending_lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: Future) -> None:
        with self._pending_lock:
            self._pending.discard(future)
        if future.exception() is not None:
            log.warning("cache promotion failed: %s", future.exception())

    def _drop_corrupt(self, tier: ByteTier, key: str, error: CorruptEntry) -> None:
        log.warning(
            "corrupt %s value for %s (%s); deleted, served as a miss", tier.name, key, error.reason
        )
        tier.delete(key)
        # The tier counted it as a hit when it read the bytes; it was a miss.
        self._stats.add(tier.name, corrupt=1, hits=-1, misses=1)
