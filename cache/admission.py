"""Per-request cap on NEW entries admitted into the memory tier.

Why: a request whose chunks all miss (a burst of cold documents) would otherwise
push k fresh entries into the memory LRU and evict the hot set that other
requests share. Capping admissions per request bounds that churn; the entries
not admitted are still served, and still written to Redis / disk.
"""

from __future__ import annotations

import threading


class AdmissionBudget:
    """How many more entries one request may add to the memory tier. Thread-safe,
    so a prefetch thread and the request thread can share one budget."""

    def __init__(self, max_new: int | None) -> None:
        if max_new is not None and max_new < 0:
            raise ValueError("max_new must be >= 0 or None (unlimited)")
        self.max_new = max_new
        self._remaining = max_new
        self._used = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Consume one admission; False when the request has used them all."""
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
