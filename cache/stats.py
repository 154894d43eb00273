"""Counters for the cache: per-tier hits/misses/bytes/evictions, corrupt values, load time."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field


@dataclass
class TierCounters:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    writes: int = 0
    evictions: int = 0
    corrupt: int = 0  # values that failed verification (deleted, served as misses)
    errors: int = 0  # backend failures (e.g. Redis down) served as misses


@dataclass
class _Loads:
    count: int = 0  # get_many calls
    keys: int = 0
    total_ms: float = 0.0
    last_ms: float = 0.0
    max_ms: float = 0.0


@dataclass
class CacheStats:
    """Thread-safe counters shared by the tiers of one store (one lock, tiny critical sections)."""

    _tiers: dict[str, TierCounters] = field(default_factory=dict)
    _loads: _Loads = field(default_factory=_Loads)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, tier: str, **deltas: int) -> None:
        """Add to a tier's counters, e.g. add("redis", hits=3, bytes_read=n)."""
        with self._lock:
            counters = self._tiers.setdefault(tier, TierCounters())
            for name, delta in deltas.items():
                setattr(counters, name, getattr(counters, name) + delta)

    def record_load(self, ms: float, n_keys: int) -> None:
        with self._lock:
            self._loads.count += 1
            self._loads.keys += n_keys
            self._loads.total_ms += ms
            self._loads.last_ms = ms
            self._loads.max_ms = max(self._loads.max_ms, ms)

    def tier(self, name: str) -> TierCounters:
        """A copy of one tier's counters (zeros if it never counted anything)."""
        with self._lock:
            return TierCounters(**asdict(self._tiers.get(name, TierCounters())))

    def snapshot(self) -> dict:
        with self._lock:
            tiers = {name: asdict(c) for name, c in self._tiers.items()}
            loads = asdict(self._loads)
        loads["mean_ms"] = loads["total_ms"] / loads["count"] if loads["count"] else 0.0
        return {
            "tiers": tiers,
            "corrupt": sum(t["corrupt"] for t in tiers.values()),
            "evictions": sum(t["evictions"] for t in tiers.values()),
            "load_ms": loads,
        }

    def reset(self) -> None:
        """Zero every counter (tiers stay listed)."""
        with self._lock:
            self._tiers = {name: TierCounters() for name in self._tiers}
            self._loads = _Loads()
