"""Counters for the cache: per-tier hits/misses/bytes/evictions, corrupt values, load time.

Each store counts in memory; `persist` adds what was counted since its last call
to running totals in a JSON file beside the data, so `kvrag stats` can show the
traffic of every process on that data dir (CLI runs, the API, cache warm).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path


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
    _persisted: dict = field(default_factory=dict, repr=False)  # raw counts at the last persist

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
            raw = self._raw()
        return summarize(raw)

    def _raw(self) -> dict:
        return {
            "tiers": {name: asdict(c) for name, c in self._tiers.items()},
            "load_ms": asdict(self._loads),
        }

    def persist(self, path: Path) -> dict:
        """Add the counts since the last persist to the totals in `path` (created if absent;
        a file lock serializes processes); returns the new totals, summarized."""
        with self._lock:
            now = self._raw()
            before, self._persisted = self._persisted, now
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            totals = load_totals(path)
            for name, counts in now["tiers"].items():
                old = before.get("tiers", {}).get(name, {})
                tier = totals["tiers"].setdefault(name, asdict(TierCounters()))
                for key, value in counts.items():
                    tier[key] = tier.get(key, 0) + value - old.get(key, 0)
            loads, old = totals["load_ms"], before.get("load_ms", asdict(_Loads()))
            for key in ("count", "keys", "total_ms"):
                loads[key] = loads.get(key, 0) + now["load_ms"][key] - old[key]
            loads["max_ms"] = max(loads.get("max_ms", 0.0), now["load_ms"]["max_ms"])
            if now["load_ms"]["count"] > old["count"]:
                loads["last_ms"] = now["load_ms"]["last_ms"]
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(totals, indent=1))
            os.replace(tmp, path)
        return summarize(totals)


def load_totals(path: Path) -> dict:
    """The raw totals persisted at `path` (empty ones if there are none yet or the file is
    unreadable)."""
    try:
        totals = json.loads(path.read_text())
        if isinstance(totals.get("tiers"), dict) and isinstance(totals.get("load_ms"), dict):
            return totals
    except (OSError, ValueError, AttributeError):
        pass
    return {"tiers": {}, "load_ms": asdict(_Loads())}


def summarize(raw: dict) -> dict:
    """Raw counters -> the snapshot shape: per tier, corrupt and evictions summed,
    mean load time."""
    tiers, loads = raw["tiers"], dict(raw["load_ms"])
    loads["mean_ms"] = loads["total_ms"] / loads["count"] if loads.get("count") else 0.0
    return {
        "tiers": tiers,
        "corrupt": sum(t.get("corrupt", 0) for t in tiers.values()),
        "evictions": sum(t.get("evictions", 0) for t in tiers.values()),
        "load_ms": loads,
    }
