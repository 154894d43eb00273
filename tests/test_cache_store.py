"""TieredStore: tier order, promotion, admission cap, write-through, prefetch, concurrency."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis
import torch

from cache.disk_tier import DiskTier
from cache.entry import ChunkKV
from cache.factory import build_store
from cache.memory_tier import MemoryTier
from cache.redis_tier import RedisTier
from cache.serde import dumps
from cache.stats import load_totals, summarize
from cache.store import TieredStore

FP = "fp"
SHARED_URL = "redis://127.0.0.1:6379/0"
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")


def make_entry(seed=0, fill: float | None = None) -> ChunkKV:
    shape = (2, 3, 16, 8)
    if fill is not None:  # k == v == fill everywhere: easy to check for torn reads
        t = torch.full(shape, fill, dtype=torch.bfloat16)
        return ChunkKV(t, t.clone(), int(fill))
    g = torch.Generator().manual_seed(seed)
    return ChunkKV(
        torch.randn(shape, generator=g).bfloat16(), torch.randn(shape, generator=g).bfloat16(), seed
    )


ENTRY_BYTES = make_entry().nbytes


def key(i: int) -> str:
    return f"{i:040x}"


def same(a: ChunkKV, b: ChunkKV) -> bool:
    return (
        torch.equal(a.k.view(torch.int16), b.k.view(torch.int16))
        and torch.equal(a.v.view(torch.int16), b.v.view(torch.int16))
        and a.base_position == b.base_position
    )


@pytest.fixture
def redis_tier():
    try:
        redis.Redis.from_url(SHARED_URL, socket_connect_timeout=0.5).ping()
    except redis.RedisError:
        pytest.skip("no Redis at 127.0.0.1:6379")
    tier = RedisTier(SHARED_URL, ttl_s=300, prefix=f"kvrag:test:{uuid.uuid4().hex}:")
    yield tier
    tier.clear()
    tier.close()


def store_with(tmp_path, redis_tier=None, memory_entries=100, max_new=None) -> TieredStore:
    memory = MemoryTier(memory_entries * ENTRY_BYTES) if memory_entries else None
    disk = DiskTier(tmp_path / "kv", 1000 * ENTRY_BYTES)
    return TieredStore(memory, redis_tier, disk, fingerprint=FP, max_new_per_request=max_new)


def test_write_through_to_every_tier(tmp_path, redis_tier):
    store = store_with(tmp_path, redis_tier)
    e = make_entry(1)
    store.put(key(1), e)
    assert key(1) in store.memory
    assert redis_tier.get_many([key(1)]) == {key(1): dumps(e, FP, key(1))}
    assert bytes(store.disk.get_many([key(1)])[key(1)]) == dumps(e, FP, key(1))
    store.close()


def test_disk_hit_is_promoted_to_redis_and_memory(tmp_path, redis_tier):
    store = store_with(tmp_path, redis_tier)
    e = make_entry(2)
    store.disk.put(key(2), dumps(e, FP, key(2)))  # only on disk
    got = store.get_many([key(2)])
    assert same(got[key(2)], e)
    store.flush()  # byte-tier promotion runs in the background
    assert key(2) in store.memory
    assert key(2) in redis_tier.get_many([key(2)])
    tiers = store.stats()["tiers"]
    assert (tiers["memory"]["misses"], tiers["redis"]["misses"], tiers["disk"]["hits"]) == (1, 1, 1)
    # Next read is a memory hit.
    store.get_many([key(2)])
    assert store.stats()["tiers"]["memory"]["hits"] == 1
    store.close()


def test_redis_hit_is_promoted_to_memory(tmp_path, redis_tier):
    store = store_with(tmp_path, redis_tier)
    e = make_entry(3)
    redis_tier.put(key(3), dumps(e, FP, key(3)))
    assert same(store.get_many([key(3)])[key(3)], e)
    assert key(3) in store.memory
    assert store.stats()["tiers"]["disk"]["misses"] == 0  # never reached
    store.close()


def test_admission_cap_per_request(tmp_path):
    store = store_with(tmp_path, memory_entries=10, max_new=2)
    for i in range(10):
        store.disk.put(key(i), dumps(make_entry(i), FP, key(i)))
    store.put_many({key(100 + i): make_entry(i) for i in range(3)})  # its own request: 2 admitted
    assert sorted(store.memory.keys()) == [key(100), key(101)]
    got = store.get_many([key(i) for i in range(6)])  # a burst of misses
    assert len(got) == 6  # all served ...
    resident = store.memory.keys()
    assert [k for k in resident if k < key(100)] == [key(0), key(1)]  # ... 2 admitted
    # One budget shared by several calls of one request.
    budget = store.begin_request()
    store.get_many([key(6)], budget)
    store.get_many([key(7), key(8)], budget)
    assert key(6) in store.memory and key(7) in store.memory and key(8) not in store.memory
    assert budget.remaining == 0 and budget.used == 2
    # Re-putting a resident key is not a new admission.
    b = store.begin_request(max_new=0)
    store.put(key(6), make_entry(60), b)
    assert store.memory.get_many([key(6)])[key(6)].base_position == 60
    store.close()


def test_corrupt_disk_file_is_miss_deleted_counted(tmp_path):
    store = store_with(tmp_path)
    data = bytearray(dumps(make_entry(1), FP))
    data[-3] ^= 0xFF
    store.disk.put(key(1), bytes(data))
    assert store.get_many([key(1)]) == {}
    assert not list((tmp_path / "kv").rglob("*.kv"))
    assert store.stats()["corrupt"] == 1
    assert store.stats()["tiers"]["disk"]["hits"] == 0
    store.close()


def test_prefetch_overlaps_and_returns_entries(tmp_path):
    store = store_with(tmp_path)
    store.put_many({key(i): make_entry(i) for i in range(3)})
    future = store.prefetch([key(0), key(2), key(9)])
    got = future.result(timeout=10)
    assert list(got) == [key(0), key(2)]
    store.close()


def test_stats_snapshot_and_reset(tmp_path):
    store = store_with(tmp_path)
    store.put(key(1), make_entry(1))
    store.get_many([key(1), key(2)])
    snap = store.stats()
    assert snap["load_ms"]["count"] == 1 and snap["load_ms"]["keys"] == 2
    assert snap["tiers"]["memory"]["hits"] == 1 and snap["tiers"]["disk"]["misses"] == 1
    assert snap["usage"]["memory"]["entries"] == 1 and snap["usage"]["disk"]["entries"] == 1
    assert set(store.stats()["tiers"]) == {"memory", "disk"}
    store.clear()
    assert store.get_many([key(1)]) == {}
    store.close()


def test_persisted_stats_sum_over_stores_and_count_once(tmp_path):
    """Every process adds its own traffic to one totals file; persisting twice adds nothing
    twice."""
    path = tmp_path / "cache_stats.json"
    a, b = store_with(tmp_path / "a"), store_with(tmp_path / "b")
    a.stats_path = b.stats_path = path
    a.put(key(1), make_entry(1))
    a.get_many([key(1), key(2)])
    a.persist_stats()
    b.get_many([key(3)])
    b.persist_stats()
    totals = a.persist_stats()  # nothing new in a
    assert totals["tiers"]["memory"]["hits"] == 1
    assert totals["tiers"]["disk"]["misses"] == 2 and totals["tiers"]["memory"]["misses"] == 2
    assert totals["load_ms"]["count"] == 2 and totals["load_ms"]["keys"] == 3
    a.get_many([key(1)])
    a.close()  # closing persists what is left
    b.close()
    assert summarize(load_totals(path))["tiers"]["memory"]["hits"] == 2


def test_unwritable_stats_path_warns_once_and_never_raises(tmp_path, caplog):
    """A read-only data dir must not fail answers: the totals stay in memory, one warning."""
    (tmp_path / "not-a-dir").write_text("")
    store = store_with(tmp_path / "a")
    store.stats_path = tmp_path / "not-a-dir" / "cache_stats.json"  # its parent cannot be made
    with caplog.at_level("WARNING", logger="cache.store"):
        for i in range(3):
            store.get_many([key(i)])
            assert store.persist_stats() is None
        store.close()
    assert sum("cannot write cache stats" in r.getMessage() for r in caplog.records) == 1
    assert store.stats()["load_ms"]["count"] == 3


@pytest.mark.parametrize("tiers", ["memory+redis+disk", "redis", "disk"])
def test_concurrent_readers_and_writers_never_see_torn_entries(tmp_path, redis_tier, tiers):
    memory = MemoryTier(4 * ENTRY_BYTES) if "memory" in tiers else None
    disk = DiskTier(tmp_path / "kv", 8 * ENTRY_BYTES) if "disk" in tiers else None
    store = TieredStore(memory, redis_tier if "redis" in tiers else None, disk, fingerprint=FP)
    hot = [key(i) for i in range(3)]
    errors: list[BaseException] = []
    stop = time.monotonic() + 1.0

    def writer(wid: int) -> None:
        n = 0
        while time.monotonic() < stop:
            n += 1
            store.put(hot[n % 3], make_entry(fill=float(wid * 100 + n % 50)))

    def reader() -> None:
        while time.monotonic() < stop:
            for e in store.get_many(hot).values():
                fill = float(e.base_position)
                if not (torch.all(e.k == fill) and torch.all(e.v == fill)):
                    raise AssertionError(f"torn entry: base {e.base_position}")

    def guard(fn, *args):
        try:
            fn(*args)
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    threads = [threading.Thread(target=guard, args=(writer, w)) for w in range(3)]
    threads += [threading.Thread(target=guard, args=(reader,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert store.stats()["corrupt"] == 0
    store.close()


def test_build_store_wires_configured_tiers(tmp_path):
    store = build_store(
        memory_mb=1,
        disk_dir=tmp_path / "kv",
        disk_mb=1,
        redis_url=None,
        redis_ttl_s=60,
        device="cpu",
        max_new_per_request=4,
        fingerprint=FP,
    )
    assert store.tier_names == ["memory", "disk"]
    assert store.memory.budget_bytes == 1 << 20 and store.max_new_per_request == 4
    store.put(key(1), make_entry(1))
    assert key(1) in store.get_many([key(1)])
    store.close()
    only_redis = build_store(
        0,
        tmp_path / "kv",
        0,
        SHARED_URL,
        60,
        "cpu",
        None,
        redis_prefix=f"kvrag:test:{uuid.uuid4().hex}:",
    )
    assert only_redis.tier_names == ["redis"]
    assert only_redis.redis.ttl_s == 60
    only_redis.close()
