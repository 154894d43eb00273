"""In-process LRU of ChunkKV objects on the engine's device, within a byte budget."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from cache.entry import ChunkKV
from cache.stats import CacheStats


class MemoryTier:
    """Holds tensors ready for the engine: a hit costs a dict lookup, no copy.

    Entries live on `device` ("cuda" when the engine runs there), so a hit skips
    the host-to-device copy too. An entry larger than the whole budget is not kept.
    """

    name = "memory"

    def __init__(
        self,
        budget_bytes: int,
        device: torch.device | str = "cpu",
        stats: CacheStats | None = None,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self.device = torch.device(device)
        self.stats = stats if stats is not None else CacheStats()
        self._entries: OrderedDict[str, ChunkKV] = OrderedDict()  # oldest first
        self._bytes = 0
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[str]) -> dict[str, ChunkKV]:
        found: dict[str, ChunkKV] = {}
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    found[key] = entry
        hit_bytes = sum(e.nbytes for e in found.values())
        self.stats.add(
            self.name, hits=len(found), misses=len(keys) - len(found), bytes_read=hit_bytes
        )
        return found

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def put(self, key: str, entry: ChunkKV) -> ChunkKV | None:
        """Store `entry` (moved to the device) and return the stored copy; None if too big."""
        if entry.nbytes > self.budget_bytes:
            return None
        # The device copy happens outside the lock: it can be slow (H2D) and
        # must not block readers of other keys.
        stored = entry.to(self.device)
        evicted = 0
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = stored
            self._bytes += stored.nbytes
            while self._bytes > self.budget_bytes:
                _, victim = self._entries.popitem(last=False)
                self._bytes -= victim.nbytes
                evicted += 1
        self.stats.add(self.name, writes=1, bytes_written=stored.nbytes, evictions=evicted)
        return stored

    def delete(self, key: str) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def usage(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self._bytes,
                "budget_bytes": self.budget_bytes,
                "device": str(self.device),
            }

    def close(self) -> None:
        self.clear()
