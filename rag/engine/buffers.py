"""Request K/V buffers, reused across requests, within a memory budget.

Fresh memory costs the OS's page faults on first touch, a reused buffer nothing. A reused
buffer holds old, finite K/V in the slots not written yet; every read of those is masked, as
it is of a fresh buffer's zeros.

With a budget, the buffers held by requests and kept for reuse never add up to more than it:
spare buffers are dropped to make room, and a request that still does not fit waits for one
to be given back (`take(wait=True)`, the scheduler's admission) or is refused.
"""

from __future__ import annotations

import threading
import weakref

import torch

from rag.model.kv_cache import KVCache
from rag.model.transformer import Transformer

SPARE_BUFFERS = 2  # released buffers kept for reuse (at least)
SLOT_ROUND = 256  # buffers are allocated in multiples of this many slots


class OverBudget(RuntimeError):
    """A buffer this large does not fit the K/V memory budget."""


class BufferPool:
    def __init__(
        self,
        model: Transformer,
        max_slots: int,
        budget_bytes: int | None = None,
        spare: int = SPARE_BUFFERS,
    ):
        self.model = model
        self.max_slots = max_slots
        self.budget = budget_bytes
        self.spare_max = max(spare, SPARE_BUFFERS)
        a = model.args
        self.slot_bytes = 2 * a.n_layers * a.n_kv_heads * a.head_dim * model.dtype.itemsize
        self._spare: list[KVCache] = []
        # Lent buffers by the address the request's view starts at: a view made under
        # inference_mode has no `_base` to find its buffer by.
        self._lent: dict[int, KVCache] = {}
        self._held = 0  # bytes of the buffers requests hold
        self.peak_bytes = 0  # the most held and kept at once
        self._cond = threading.Condition()

    def _bytes(self, slots: int) -> int:
        return slots * self.slot_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes held by requests plus bytes kept for reuse."""
        return self._held + sum(self._bytes(b.max_len) for b in self._spare)

    def take(self, n_slots: int, wait: bool = False) -> KVCache:
        """A buffer of n_slots (`give_back` it when done): a view of a released one that is
        large enough, else a new one rounded up so later requests of about this size fit.
        Over the budget: wait for a buffer to come back, or raise OverBudget."""
        n_slots = min(n_slots, self.max_slots)
        rounded = min(self.max_slots, -(-n_slots // SLOT_ROUND) * SLOT_ROUND)
        if self.budget is not None and self._bytes(n_slots) > self.budget:
            raise OverBudget(f"{n_slots} K/V slots exceed the budget of {self.budget} bytes")
        with self._cond:
            while True:
                fits = [b for b in self._spare if b.max_len >= n_slots]
                if fits:
                    buf = min(fits, key=lambda b: b.max_len)
                    self._spare = [b for b in self._spare if b is not buf]  # (not ==: tensors)
                    break
                if self.budget is not None:  # drop spares, the smallest first, to make room
                    while self._spare and self.used_bytes + self._bytes(rounded) > self.budget:
                        self._spare.pop(0)
                    if self._held + self._bytes(rounded) > self.budget:
                        rounded = n_slots  # an exact fit may still go
                if self.budget is None or self.used_bytes + self._bytes(rounded) <= self.budget:
                    buf = None
                    break
                if not wait:
                    raise OverBudget(
                        f"{n_slots} K/V slots do not fit: {self._held} of {self.budget} bytes"
                        " held by running requests"
                    )
                self._cond.wait()
            self._held += self._bytes(buf.max_len if buf is not None else rounded)
            self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        if buf is None:
            with torch.inference_mode(False):  # a buffer any later request may write into
                buf = self.model.new_cache(rounded)
        view = KVCache(buf.k[:, :, :, :n_slots], buf.v[:, :, :, :n_slots])
        with self._cond:
            self._lent[buf.k.data_ptr()] = buf
        # A request dropped without `give_back` frees its memory, not a slot of the budget.
        weakref.finalize(view, self._forget, buf.k.data_ptr())
        return view

    def _forget(self, ptr: int) -> None:
        with self._cond:
            buf = self._lent.pop(ptr, None)
            if buf is not None:
                self._held -= self._bytes(buf.max_len)
                self._cond.notify_all()

    def give_back(self, cache: KVCache) -> None:
        """Hand a buffer from `take` back for reuse; `cache` must not be used afterwards."""
        with self._cond:
            buf = self._lent.pop(cache.k.data_ptr(), None)  # None: not lent, or given back
            if buf is not None:
                self._held -= self._bytes(buf.max_len)
                self._spare.append(buf)
                self._spare = sorted(self._spare, key=lambda b: b.max_len)[-self.spare_max :]
            self._cond.notify_all()
