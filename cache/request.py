"""One request's use of the store: its memory admissions, and what each tier served it.

Admissions: a request whose chunks all miss (a burst of cold documents) would otherwise push k
fresh entries into the memory LRU and evict the hot set that other requests share. Capping
admissions per request bounds that churn; the entries not admitted are still served, and still
written to Redis / disk.

Counts: the store's global counters add up every request's traffic; these are this request's
own, so concurrent requests never see each other's hits.
"""

from __future__ import annotations

import threading


class StoreRequest:
    """Thread-safe: the store's prefetch threads and the request's thread share one."""

    def __init__(self, max_new: int | None) -> None:
        if max_new is not None and max_new < 0:
            raise ValueError("max_new must be >= 0 or None (unlimited)")
        self.max_new = max_new
        self._remaining = max_new
        self._used = 0
        self._served: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()
        self.wait_ms = 0.0  # time the request spent blocked on loads (TieredStore.stream)

    def take(self) -> bool:
        """Consume one memory admission; False when the request has used them all."""
        with self._lock:
            if self._remaining is not None:
                if self._remaining <= 0:
                    return False
                self._remaining -= 1
            self._used += 1
            return True

    @property
    def remaining(self) -> int | None:
        """Admissions left (None: unlimited)."""
        with self._lock:
            return self._remaining

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    def record(self, tier: str, hits: int, misses: int) -> None:
        with self._lock:
            counts = self._served.setdefault(tier, {"hits": 0, "misses": 0})
            counts["hits"] += hits
            counts["misses"] += misses

    def served(self) -> dict[str, dict[str, int]]:
        """{tier: {"hits", "misses"}} for this request's lookups so far."""
        with self._lock:
            return {tier: dict(c) for tier, c in self._served.items()}
