"""build_store: a TieredStore from plain settings (what the config layer holds)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cache.cluster_tier import RedisClusterTier
from cache.cluster_url import is_cluster_url
from cache.disk_tier import DiskTier
from cache.memory_tier import MemoryTier
from cache.redis_tier import DEFAULT_PREFIX, RedisTier
from cache.stats import CacheStats
from cache.store import TieredStore

MB = 1 << 20  # budgets are MiB


def build_store(
    memory_mb: float,
    disk_dir: str | os.PathLike | None,
    disk_mb: float,
    redis_url: str | None,
    redis_ttl_s: int | None,
    device: torch.device | str = "cpu",
    max_new_per_request: int | None = None,
    *,
    fingerprint: str = "",
    redis_prefix: str = DEFAULT_PREFIX,
    stats_path: Path | None = None,
) -> TieredStore:
    """Memory tier unless memory_mb == 0; disk tier unless disk_mb == 0 (or no dir);
    Redis tier only when redis_url is set: one server (redis://, rediss://, unix://) or a
    Redis Cluster (redis+cluster://host:port,host:port/). Never touches the network here:
    an unreachable Redis shows up later as misses plus one warning."""
    stats = CacheStats()
    memory = MemoryTier(int(memory_mb * MB), device, stats) if memory_mb > 0 else None
    disk = (
        DiskTier(disk_dir, int(disk_mb * MB), stats)
        if disk_dir is not None and disk_mb > 0
        else None
    )
    redis = None
    if redis_url:
        tier = RedisClusterTier if is_cluster_url(redis_url) else RedisTier
        redis = tier(redis_url, redis_ttl_s, redis_prefix, stats)
    return TieredStore(
        memory,
        redis,
        disk,
        fingerprint=fingerprint,
        device=device,
        max_new_per_request=max_new_per_request,
        stats=stats,
        stats_path=stats_path,
    )
