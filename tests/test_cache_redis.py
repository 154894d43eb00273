"""Redis tier against real Redis: the shared server on :6379 (own key prefix, deletes only
its keys) and a private redis-server this test starts, kills and restarts."""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid

import pytest
import redis
import torch

from cache.entry import ChunkKV
from cache.redis_tier import RedisTier
from cache.serde import dumps
from cache.store import TieredStore
from rag.server.run import free_port

FP = "fp"
SHARED_URL = "redis://127.0.0.1:6379/0"
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")


def make_entry(seed=0, shape=(2, 3, 16, 8)) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    return ChunkKV(
        torch.randn(shape, generator=g).bfloat16(), torch.randn(shape, generator=g).bfloat16(), seed
    )


def key(i: int) -> str:
    return f"{i:040x}"


def same(a: ChunkKV, b: ChunkKV) -> bool:
    return (
        torch.equal(a.k.view(torch.int16), b.k.view(torch.int16))
        and torch.equal(a.v.view(torch.int16), b.v.view(torch.int16))
        and a.base_position == b.base_position
    )


@pytest.fixture
def shared_tier():
    try:
        redis.Redis.from_url(SHARED_URL, socket_connect_timeout=0.5).ping()
    except redis.RedisError:
        pytest.skip("no Redis at 127.0.0.1:6379")
    tier = RedisTier(SHARED_URL, ttl_s=300, prefix=f"kvrag:test:{uuid.uuid4().hex}:")
    yield tier
    tier.clear()  # only this test's prefix
    tier.close()


def count_under(tier: RedisTier) -> int:
    return sum(1 for _ in tier.client.scan_iter(match=tier.prefix + "*", count=1000))


# -- shared Redis ----------------------------------------------------------------------


def test_round_trip_ttl_and_prefix(shared_tier):
    store = TieredStore(redis=shared_tier, fingerprint=FP)
    e = make_entry(1)
    store.put(key(1), e)
    raw = shared_tier.client.get(shared_tier.prefix + key(1))
    assert raw == dumps(e, FP, key(1))  # one value: header + payload
    assert 0 < shared_tier.client.ttl(shared_tier.prefix + key(1)) <= 300
    assert same(store.get_many([key(1)])[key(1)], e)
    assert store.get_many([key(2)]) == {}
    snap = store.stats()["tiers"]["redis"]
    assert (snap["hits"], snap["misses"], snap["writes"]) == (1, 1, 1)
    store.close()


def test_realistic_chunk_through_redis(shared_tier):
    store = TieredStore(redis=shared_tier, fingerprint=FP)
    e = make_entry(2, shape=(30, 3, 512, 64))  # 11.8 MB
    store.put(key(2), e)
    got = store.get_many([key(2)])[key(2)]
    assert same(got, e) and got.nbytes == 11_796_480
    store.close()


def test_batched_get_preserves_request_order_and_skips_misses(shared_tier):
    store = TieredStore(redis=shared_tier, fingerprint=FP)
    store.put_many({key(i): make_entry(i) for i in (3, 1, 2)})
    got = store.get_many([key(2), key(9), key(1), key(3), key(2)])
    assert list(got) == [key(2), key(1), key(3)]
    assert [e.base_position for e in got.values()] == [2, 1, 3]
    store.close()


def test_clear_deletes_only_own_prefix(shared_tier):
    other = RedisTier(SHARED_URL, ttl_s=300, prefix=shared_tier.prefix[:-1] + "-other:")
    try:
        shared_tier.put_many({key(i): b"x" for i in range(600)})  # > one UNLINK batch
        other.put(key(0), b"y")
        assert count_under(shared_tier) == 600
        shared_tier.clear()
        assert count_under(shared_tier) == 0
        assert other.get_many([key(0)]) == {key(0): b"y"}
    finally:
        other.clear()
        other.close()


def test_corrupt_value_in_redis_is_a_miss_deleted_and_counted(shared_tier, caplog):
    store = TieredStore(redis=shared_tier, fingerprint=FP)
    good = dumps(make_entry(1), FP)
    shared_tier.client.set(shared_tier.prefix + key(1), good[:-10], ex=60)  # truncated
    shared_tier.client.set(shared_tier.prefix + key(2), dumps(make_entry(2), "other-model"), ex=60)
    bad = bytearray(good)
    bad[100] ^= 1
    shared_tier.client.set(shared_tier.prefix + key(3), bytes(bad), ex=60)
    with caplog.at_level(logging.WARNING, logger="cache.store"):
        assert store.get_many([key(1), key(2), key(3)]) == {}
    assert shared_tier.client.exists(*(shared_tier.prefix + key(i) for i in (1, 2, 3))) == 0
    snap = store.stats()
    assert snap["corrupt"] == 3
    assert snap["tiers"]["redis"]["hits"] == 0 and snap["tiers"]["redis"]["misses"] == 3
    assert sum("corrupt" in r.message for r in caplog.records) == 3
    store.close()


def test_no_ttl_when_disabled(shared_tier):
    tier = RedisTier(SHARED_URL, ttl_s=None, prefix=shared_tier.prefix)
    tier.put(key(1), b"v")
    assert tier.ttl(key(1)) == -1
    tier.close()


# -- a private redis-server: outages ----------------------------------------------------


def warnings_from_tier(caplog) -> list[logging.LogRecord]:
    """The outage warnings (a recovery is logged at WARNING too, as "... is back")."""
    return [
        r
        for r in caplog.records
        if r.name == "cache.redis_tier"
        and r.levelno == logging.WARNING
        and "is back" not in r.message
    ]


def test_redis_dies_mid_sequence_then_comes_back(private_redis, caplog):
    tier = RedisTier(
        private_redis.url,
        ttl_s=60,
        prefix="kvrag:t:",
        retry_min_s=0.05,
        retry_max_s=0.2,
        connect_timeout_s=0.5,
    )
    store = TieredStore(redis=tier, fingerprint=FP)
    entries = {key(i): make_entry(i) for i in range(3)}
    caplog.set_level(logging.INFO, logger="cache.redis_tier")

    store.put_many(entries)
    assert len(store.get_many(list(entries))) == 3

    private_redis.kill()
    start = time.monotonic()
    for _ in range(20):  # a sequence of requests during the outage
        assert store.get_many(list(entries)) == {}
        store.put(key(7), make_entry(7))  # writes are dropped, not raised
        time.sleep(0.02)
    assert time.monotonic() - start < 5  # no connect timeout per request
    assert len(warnings_from_tier(caplog)) == 1
    assert not tier.usage()["up"]
    redis_stats = store.stats()["tiers"]["redis"]
    assert redis_stats["misses"] >= 60 and redis_stats["errors"] >= 1

    private_redis.start()  # same port, empty (no persistence)
    deadline = time.monotonic() + 5
    while True:
        store.put_many(entries)
        if len(store.get_many(list(entries))) == 3:
            break
        assert time.monotonic() < deadline, "store never reconnected"
        time.sleep(0.05)
    assert len(warnings_from_tier(caplog)) == 1  # still one warning for the one outage
    back = [r for r in caplog.records if r.name == "cache.redis_tier" and "is back" in r.message]
    assert len(back) == 1 and back[0].levelno == logging.WARNING
    assert tier.usage()["up"]
    store.close()


def test_hung_redis_costs_one_socket_timeout_then_skips(private_redis, caplog):
    tier = RedisTier(
        private_redis.url,
        ttl_s=60,
        prefix="kvrag:t:",
        socket_timeout_s=0.3,
        retry_min_s=0.5,
        retry_max_s=0.5,
    )
    store = TieredStore(redis=tier, fingerprint=FP)
    store.put(key(1), make_entry(1))
    assert key(1) in store.get_many([key(1)])
    os.kill(private_redis.proc.pid, signal.SIGSTOP)  # alive but not answering
    try:
        with caplog.at_level(logging.WARNING, logger="cache.redis_tier"):
            start = time.monotonic()
            assert store.get_many([key(1)]) == {}
            first = time.monotonic() - start
            start = time.monotonic()
            for _ in range(10):
                assert store.get_many([key(1)]) == {}
            rest = time.monotonic() - start
    finally:
        os.kill(private_redis.proc.pid, signal.SIGCONT)
    assert 0.25 < first < 1.0  # one socket timeout, no retry on top
    assert rest < 0.2  # inside the backoff window: no network at all
    assert len(warnings_from_tier(caplog)) == 1
    deadline = time.monotonic() + 5
    while key(1) not in store.get_many([key(1)]):
        assert time.monotonic() < deadline, "store never recovered"
        time.sleep(0.05)
    store.close()


def test_redis_unreachable_at_start_is_a_miss(caplog):
    tier = RedisTier(f"redis://127.0.0.1:{free_port()}/0", ttl_s=60, prefix="kvrag:t:")
    store = TieredStore(redis=tier, fingerprint=FP)
    with caplog.at_level(logging.WARNING, logger="cache.redis_tier"):
        for _ in range(5):
            store.put(key(1), make_entry(1))
            assert store.get_many([key(1)]) == {}
        store.clear()
    assert len(warnings_from_tier(caplog)) == 1
    assert tier.is_up() is False
    store.close()
