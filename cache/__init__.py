"""Tiered chunk-KV store: keys, serialization, memory / Redis / disk tiers.

Knows keys, bytes and tensors; nothing about models or HTTP.
"""

from cache.entry import ChunkKV
from cache.factory import build_store
from cache.keys import chunk_key, fingerprint_tensors
from cache.request import StoreRequest
from cache.serde import CorruptEntry, dumps, loads
from cache.stats import CacheStats
from cache.store import TieredStore

__all__ = [
    "StoreRequest",
    "CacheStats",
    "ChunkKV",
    "CorruptEntry",
    "TieredStore",
    "build_store",
    "chunk_key",
    "dumps",
    "fingerprint_tensors",
    "loads",
]
