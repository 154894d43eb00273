"""Request K/V buffers, reused across requests.

Fresh memory costs the OS's page faults on first touch, a reused buffer nothing. A reused
buffer holds old, finite K/V in the slots not written yet; every read of those is masked, as
it is of a fresh buffer's zeros.
"""

from __future__ import annotations

import threading

from rag.model.kv_cache import KVCache
from rag.model.transformer import Transformer

SPARE_BUFFERS = 2  # released buffers kept for reuse
SLOT_ROUND = 256  # buffers are allocated in multiples of this many slots


class BufferPool:
    def __init__(self, model: Transformer, max_slots: int):
        self.model = model
        self.max_slots = max_slots
        self._spare: list[KVCache] = []
        self._lock = threading.Lock()

    def take(self, n_slots: int) -> KVCache:
        """A buffer of n_slots (`give_back` it when done): a view of a released one that is
        large enough, else a new one rounded up so later requests of about this size fit."""
        n_slots = min(n_slots, self.max_slots)
        with self._lock:
            fits = [b for b in self._spare if b.max_len >= n_slots]
            if fits:
                buf = min(fits, key=lambda b: b.max_len)
                # By identity: KVCache's dataclass == would compare the tensors.
                self._spare = [b for b in self._spare if b is not buf]
        if not fits:
            rounded = -(-n_slots // SLOT_ROUND) * SLOT_ROUND
            buf = self.model.new_cache(min(self.max_slots, rounded))
        return KVCache(buf.k[:, :, :, :n_slots], buf.v[:, :, :, :n_slots])

    def give_back(self, cache: KVCache) -> None:
        """Hand a buffer from `take` back for reuse; `cache` must not be used afterwards."""
        k, v = cache.k._base, cache.v._base  # the whole buffer the request had a view of
        if k is None or v is None:
            return
        with self._lock:
            if all(b.k.data_ptr() != k.data_ptr() for b in self._spare):
                self._spare.append(KVCache(k, v))
                self._spare = sorted(self._spare, key=lambda b: b.max_len)[-SPARE_BUFFERS:]
