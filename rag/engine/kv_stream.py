"""A request's chunk K/V, streamed from the tiered store while the engine works.

Every chunk is requested at once on the store's prefetch threads (Redis socket
reads, file reads, checksums and deserialization release the GIL): the first
chunk alone, the others in one batched read. Chunks are handed over in prompt
order as they land: the engine stitches the first (re-rotate, copy into the
request buffer) while the others are still on the wire, and a miss is computed
on the spot while the remaining loads go on. The sequential alternative (load
all, then stitch) is measured against it in `kvrag bench cache`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from cache.entry import ChunkKV
from cache.store import TieredStore
from rag.engine.engine import Engine
from rag.engine.prompt import Prompt

log = logging.getLogger(__name__)


def stream_chunk_kvs(store: TieredStore, engine: Engine, prompt: Prompt,
                     stats: dict[str, int] | None = None) -> Iterator[ChunkKV]:
    """Start loading every chunk of `prompt` now; yield their K/V in order as they arrive.

    Misses are computed when their turn comes and written to the store once the stream is
    exhausted; `stats` then gets kv_hits, kv_misses and kv_wait_ms (time spent blocked on loads).
    """
    keys = [engine.chunk_key(ids) for ids in prompt.chunks]
    budget = store.begin_request()
    # Two reads, submitted before the first yield: the first chunk alone (it arrives first and
    # is stitched while the rest load) and the others in one batch (one MGET, not k GETs).
    first, rest = store.prefetch(keys[:1], budget), store.prefetch(keys[1:], budget)
    loads = [first] + [rest] * (len(keys) - 1)

    def stream() -> Iterator[ChunkKV]:
        computed: dict[str, ChunkKV] = {}
        waited = 0.0
        for key, ids, load in zip(keys, prompt.chunks, loads, strict=True):
            t0 = time.perf_counter()
            try:
                kv = load.result().get(key)
            except Exception:  # a store failure must never fail the request: recompute
                log.warning("chunk K/V load failed; recomputing", exc_info=True)
                kv = None
            waited += time.perf_counter() - t0
            if kv is None:
                kv = computed[key] = engine.chunk_kv(ids)
            yield kv
        store.put_many(computed, budget)
        if stats is not None:
            stats.update(kv_hits=len(keys) - len(computed), kv_misses=len(computed), kv_wait_ms=1000 * waited)

    return stream()
