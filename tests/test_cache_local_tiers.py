"""Memory and disk tiers on their own: LRU order within budgets, atomic files, restarts."""

from __future__ import annotations

import os
import time

import pytest
import torch

from cache.disk_tier import DiskTier
from cache.entry import ChunkKV
from cache.memory_tier import MemoryTier
from cache.serde import dumps, loads
from cache.stats import CacheStats

FP = "fp"
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")


def make_entry(seed=0, n_tokens=16) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3, n_tokens, 8)
    return ChunkKV(
        torch.randn(shape, generator=g).bfloat16(), torch.randn(shape, generator=g).bfloat16(), seed
    )


def key(i: int) -> str:
    return f"{i:040x}"


ENTRY_BYTES = make_entry().nbytes  # 1536


# -- memory tier -----------------------------------------------------------------


def test_memory_lru_evicts_least_recently_used_within_budget():
    stats = CacheStats()
    mem = MemoryTier(3 * ENTRY_BYTES, "cpu", stats)
    for i in range(3):
        mem.put(key(i), make_entry(i))
    mem.get_many([key(0)])  # 0 becomes most recent: order 1, 2, 0
    mem.put(key(3), make_entry(3))  # evicts 1
    assert mem.keys() == [key(2), key(0), key(3)]
    mem.put(key(4), make_entry(4))  # evicts 2
    assert mem.keys() == [key(0), key(3), key(4)]
    assert mem.usage()["bytes"] == 3 * ENTRY_BYTES <= mem.budget_bytes
    assert stats.tier("memory").evictions == 2


def test_memory_byte_budget_counts_sizes_and_rejects_oversized():
    mem = MemoryTier(3 * ENTRY_BYTES)
    mem.put(key(0), make_entry(0))
    mem.put(key(1), make_entry(1, n_tokens=32))  # 2 units: full
    assert len(mem) == 2
    mem.put(key(2), make_entry(2))  # needs 1 unit: evicts 0 only
    assert mem.keys() == [key(1), key(2)]
    assert mem.put(key(9), make_entry(9, n_tokens=64)) is None  # larger than the budget
    assert key(9) not in mem and len(mem) == 2


def test_memory_replace_and_delete_keep_byte_count():
    mem = MemoryTier(10 * ENTRY_BYTES)
    mem.put(key(0), make_entry(0))
    mem.put(key(0), make_entry(1))
    assert mem.usage()["bytes"] == ENTRY_BYTES
    assert mem.get_many([key(0)])[key(0)].base_position == 1
    mem.delete(key(0))
    assert mem.usage()["bytes"] == 0 and len(mem) == 0


def test_memory_moves_entries_to_its_device():
    mem = MemoryTier(10 * ENTRY_BYTES, "meta")  # stands in for "cuda" on a CPU-only box
    stored = mem.put(key(0), make_entry(0))
    assert stored.device.type == "meta"
    assert mem.get_many([key(0)])[key(0)].k.device.type == "meta"


# -- disk tier -------------------------------------------------------------------


def value(i: int, n_tokens=16) -> bytes:
    return dumps(make_entry(i, n_tokens), FP)


VALUE_BYTES = len(value(0))


def all_files(root) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )


def test_disk_round_trip_sharded_and_no_temp_files(tmp_path):
    disk = DiskTier(tmp_path / "kv", 10 * VALUE_BYTES)
    disk.put(key(1), value(1))
    disk.put(key(1), value(2))  # overwrite is atomic too
    files = all_files(tmp_path / "kv")
    assert files == [os.path.join(key(1)[:2], key(1) + ".kv")]
    got = disk.get_many([key(1), key(2)])
    assert list(got) == [key(1)]
    assert loads(got[key(1)], FP).base_position == 2


def test_disk_lru_eviction_deletes_oldest_files(tmp_path):
    stats = CacheStats()
    disk = DiskTier(tmp_path, 3 * VALUE_BYTES, stats)
    for i in range(3):
        disk.put(key(i), value(i))
    disk.get_many([key(0)])  # order 1, 2, 0
    disk.put(key(3), value(3))
    assert disk.keys() == [key(2), key(0), key(3)]
    assert not (tmp_path / key(1)[:2] / (key(1) + ".kv")).exists()
    assert len(all_files(tmp_path)) == 3
    assert disk.usage()["bytes"] <= disk.budget_bytes
    assert stats.tier("disk").evictions == 1


def test_disk_index_rebuilt_from_mtimes_at_start(tmp_path):
    disk = DiskTier(tmp_path, 10 * VALUE_BYTES)
    for i in range(3):
        disk.put(key(i), value(i))
    now = time.time()
    for age, i in ((30, 2), (20, 0), (10, 1)):  # oldest first: 2, 0, 1
        path = tmp_path / key(i)[:2] / (key(i) + ".kv")
        os.utime(path, (now - age, now - age))
    (tmp_path / "00").mkdir(exist_ok=True)
    stale = tmp_path / "00" / ".partial.tmp"
    stale.write_bytes(b"half")
    os.utime(stale, (now - 3600, now - 3600))
    reopened = DiskTier(tmp_path, 2 * VALUE_BYTES)  # smaller budget: evicts at start
    assert reopened.keys() == [key(0), key(1)]
    assert not stale.exists()  # crashed writer's leftover removed
    assert reopened.usage()["bytes"] == 2 * VALUE_BYTES


def test_disk_failed_write_leaves_no_temp_file(tmp_path):
    disk = DiskTier(tmp_path, 10 * VALUE_BYTES)
    target = tmp_path / key(5)[:2] / (key(5) + ".kv")
    target.mkdir(parents=True)  # os.replace onto a directory fails
    disk.put(key(5), value(5))
    assert all(not f.endswith(".tmp") for f in all_files(tmp_path))
    assert disk.stats.tier("disk").errors == 1
    assert disk.get_many([key(5)]) == {}  # a directory is not a value


def test_disk_clear_removes_only_its_files(tmp_path):
    disk = DiskTier(tmp_path, 10 * VALUE_BYTES)
    disk.put(key(1), value(1))
    (tmp_path / "README").write_text("not ours")
    disk.clear()
    assert all_files(tmp_path) == ["README"]
    assert disk.usage()["entries"] == 0


def test_disk_rejects_path_like_keys(tmp_path):
    disk = DiskTier(tmp_path, 10 * VALUE_BYTES)
    with pytest.raises(ValueError):
        disk.put("../../etc/passwd", b"x")
