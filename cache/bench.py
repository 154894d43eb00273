"""Per-tier load latency of one realistic chunk, and the Redis path against a raw GET.

`ratio_to_raw` = store's Redis MB/s / a plain redis-py GET's MB/s of the same
value on the same connection settings, measured interleaved in the same run:
everything the store adds (MGET bookkeeping, header parse, checksum, tensor wrap)
shows up there. Target >= 0.8.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable

import torch

from cache.disk_tier import DiskTier
from cache.entry import ChunkKV
from cache.memory_tier import MemoryTier
from cache.redis_tier import RedisTier
from cache.serde import dumps
from cache.store import TieredStore

_FINGERPRINT = "bench"
_KEY = "b" * 40


def realistic_entry(
    n_layers: int = 30,
    n_kv_heads: int = 3,
    n_tokens: int = 512,
    head_dim: int = 64,
    dtype: torch.dtype = torch.bfloat16,
) -> ChunkKV:
    """SmolLM2-135M's KV for a 512-token chunk: 11.8 MB in 16-bit."""
    g = torch.Generator().manual_seed(0)
    shape = (n_layers, n_kv_heads, n_tokens, head_dim)
    return ChunkKV(
        torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype), 0
    )


def bench_tiers(
    redis_url: str | None = "redis://127.0.0.1:6379/0",
    disk_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    repeats: int = 10,
    entry: ChunkKV | None = None,
) -> dict:
    """Median get_ms per tier, each tier alone with the value already stored.

    disk_dir: where to put the disk tier's files (a fresh subdirectory is used
    and removed); default a temp dir. Redis keys go under a unique prefix and
    are deleted afterwards. Disk reads are page-cache warm (repeated reads).
    """
    entry = entry if entry is not None else realistic_entry()
    value_bytes = len(dumps(entry, _FINGERPRINT))
    mb = value_bytes / 1e6
    out: dict = {
        "chunk_bytes": entry.nbytes,
        "value_bytes": value_bytes,
        "repeats": repeats,
        "tiers": {},
    }

    with TieredStore(
        memory=MemoryTier(2 * entry.nbytes, device), fingerprint=_FINGERPRINT, device=device
    ) as store:
        store.put(_KEY, entry)
        out["tiers"]["memory"] = {"get_ms": _median_ms(lambda: _must_hit(store), repeats)}

    if redis_url:
        out["tiers"]["redis"] = _bench_redis(redis_url, entry, mb, repeats)

    base = tempfile.mkdtemp(prefix="kvrag-bench-", dir=disk_dir)
    try:
        disk = DiskTier(os.path.join(base, "kv"), 4 * value_bytes)
        with TieredStore(disk=disk, fingerprint=_FINGERPRINT, device=device) as store:
            store.put(_KEY, entry)
            ms = _median_ms(lambda: _must_hit(store), repeats)
            out["tiers"]["disk"] = {"get_ms": ms, "mb_per_s": mb / (ms / 1e3)}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


def _bench_redis(url: str, entry: ChunkKV, mb: float, repeats: int) -> dict:
    tier = RedisTier(url, ttl_s=600, prefix=f"kvrag:bench:{uuid.uuid4().hex}:")
    store = TieredStore(redis=tier, fingerprint=_FINGERPRINT)
    try:
        store.put(_KEY, entry)
        if not store.get_many([_KEY]):
            return {"error": f"Redis at {url} unreachable or value not stored"}
        raw_key = tier.prefix + _KEY
        store_ms: list[float] = []
        raw_ms: list[float] = []
        for _ in range(repeats):  # interleaved, so machine noise hits both alike
            raw_ms.append(_time_ms(lambda: tier.client.get(raw_key)))
            store_ms.append(_time_ms(lambda: _must_hit(store)))
        get_ms, raw = statistics.median(store_ms), statistics.median(raw_ms)
        mb_per_s, raw_mb_per_s = mb / (get_ms / 1e3), mb / (raw / 1e3)
        return {
            "get_ms": get_ms,
            "mb_per_s": mb_per_s,
            "raw_get_ms": raw,
            "raw_mb_per_s": raw_mb_per_s,
            "ratio_to_raw": mb_per_s / raw_mb_per_s,
        }
    finally:
        tier.clear()
        store.close()


def _must_hit(store: TieredStore) -> None:
    if _KEY not in store.get_many([_KEY]):
        raise RuntimeError("bench value missing from the store")


def _time_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (first-touch page faults, connection setup)
    return statistics.median(_time_ms(fn) for _ in range(repeats))
