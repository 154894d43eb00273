"""Redis Cluster tier against a real Redis Cluster on loopback (3 masters, redis-server processes
this module starts, kills and tears down): values, TTL and checksums as on one server, batched
reads grouped by node, a killed master, a failover, maxmemory with and without eviction."""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter

import pytest
import redis
import redis.connection

from cache.cluster_tier import RedisClusterTier
from cache.cluster_url import parse_cluster_url
from cache.factory import build_store
from cache.redis_tier import RedisTier
from cache.serde import dumps
from cache.store import TieredStore
from eval.redis_local import LocalCluster, have_redis_server
from rag.server.run import free_port
from tests.test_cache_redis import FP, key, make_entry, same

pytestmark = [
    pytest.mark.filterwarnings("ignore:The given buffer is not writable"),
    pytest.mark.skipif(not have_redis_server(), reason="redis-server / redis-cli not on PATH"),
]
LOGGER = "cache.cluster_tier"


@pytest.fixture(scope="module")
def cluster():
    """3 masters with a replica each, shared by the module's non-destructive tests."""
    with LocalCluster(masters=3, replicas=1) as c:
        yield c


@pytest.fixture
def tier(cluster):
    t = RedisClusterTier(cluster.url, ttl_s=300, prefix=f"kvrag:test:{uuid.uuid4().hex}:")
    yield t
    t.clear()
    t.close()


def tier_warnings(caplog) -> list[logging.LogRecord]:
    """The outage warnings (a recovery is logged at WARNING too, as "... is back")."""
    return [
        r
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.WARNING and "is back" not in r.message
    ]


def owner_port(cluster: LocalCluster, tier: RedisClusterTier, k: str) -> int:
    return cluster.master_of(tier.prefix + k).port


def count_under(cluster: LocalCluster, prefix: str) -> int:
    return sum(
        sum(1 for _ in n.client().scan_iter(match=prefix + "*", count=1000))
        for n in cluster.masters()
    )


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- no server needed -------------------------------------------------------------------


def test_cluster_url_forms_and_the_factory_choice():
    nodes, opts = parse_cluster_url("redis+cluster://a:7000,b:7001/")
    assert nodes == [("a", 7000), ("b", 7001)] and opts == {"ssl": False}
    nodes, opts = parse_cluster_url("rediss+cluster://u:p%40ss@h1:7000,[::1]:7001,h3")
    assert nodes == [("h1", 7000), ("::1", 7001), ("h3", 6379)]
    assert opts == {"ssl": True, "username": "u", "password": "p@ss"}
    for bad in (
        "redis+cluster://h:7000/2",
        "redis+cluster://h:x/",
        "redis://h:6379/0",
        "redis+cluster://h:7000/?socket_timeout=1",
        "redis+cluster://h:7000,/",
    ):
        with pytest.raises(ValueError):
            parse_cluster_url(bad)
    # Built without touching the network; a single-node URL still gets the single-node tier.
    dead = f"redis+cluster://user:secret@127.0.0.1:{free_port()}/"
    with build_store(0, None, 0, dead, 60) as store:
        assert isinstance(store.redis, RedisClusterTier)
        assert "secret" not in store.redis.usage()["url"]
    with build_store(0, None, 0, "redis://127.0.0.1:6379/0", 60) as store:
        assert type(store.redis) is RedisTier


# -- a healthy cluster --------------------------------------------------------------------


def test_values_spread_over_every_master_with_checksum_ttl_and_order(cluster, tier):
    store = TieredStore(redis=tier, fingerprint=FP)
    entries = {key(i): make_entry(i) for i in range(24)}
    store.put_many(entries)
    assert len(Counter(owner_port(cluster, tier, k) for k in entries)) == 3  # all masters hold some
    for k, e in list(entries.items())[:6]:
        node = cluster.master_of(tier.prefix + k).client()
        assert node.get(tier.prefix + k) == dumps(e, FP, k)  # one value per chunk, as on one server
        assert 0 < node.ttl(tier.prefix + k) <= 300
    assert 0 < tier.ttl(key(3)) <= 300 and tier.ttl(key(99)) == -2
    got = store.get_many([key(5), key(99), key(1), key(5), key(20)])
    assert list(got) == [key(5), key(1), key(20)]
    assert all(same(got[k], entries[k]) for k in got)
    snap = store.stats()["tiers"]["redis"]
    assert (snap["hits"], snap["misses"], snap["writes"], snap["errors"]) == (3, 1, 24, 0)
    assert tier.is_up() and tier.usage()["up"] and len(tier.usage()["masters"]) == 3
    store.close()


def test_batched_read_is_one_pipeline_per_master_sent_before_any_read(cluster, tier, monkeypatch):
    values = {key(i): bytes([i]) * 1000 for i in range(30)}
    tier.put_many(values)
    events: list[tuple[str, int]] = []
    connection = redis.connection.Connection
    send, read = connection.send_packed_command, connection.read_response

    def spy_send(self, *args, **kwargs):
        events.append(("send", self.port))
        return send(self, *args, **kwargs)

    def spy_read(self, *args, **kwargs):
        events.append(("read", self.port))
        return read(self, *args, **kwargs)

    monkeypatch.setattr(connection, "send_packed_command", spy_send)
    monkeypatch.setattr(connection, "read_response", spy_read)
    got = tier.get_many([*values, key(777)])
    monkeypatch.undo()
    assert got == values
    sends = [port for kind, port in events if kind == "send"]
    assert len(sends) == 3 and set(sends) == {owner_port(cluster, tier, k) for k in values}
    assert [kind for kind, _ in events[:3]] == ["send"] * 3  # the three nodes work at once
    assert sum(kind == "read" for kind, _ in events) == 31  # one reply per key, in one pass


def test_corrupt_value_in_the_cluster_is_a_miss_deleted_and_counted(cluster, tier, caplog):
    store = TieredStore(redis=tier, fingerprint=FP)
    good = dumps(make_entry(1), FP)
    for k, value in ((key(1), good[:-10]), (key(2), dumps(make_entry(2), "other-model"))):
        cluster.master_of(tier.prefix + k).client().set(tier.prefix + k, value, ex=60)
    with caplog.at_level(logging.WARNING, logger="cache.store"):
        assert store.get_many([key(1), key(2)]) == {}
    assert tier.get_many([key(1), key(2)]) == {}  # deleted on their nodes
    assert store.stats()["corrupt"] == 2
    store.close()


def test_clear_deletes_only_own_prefix_on_every_master(cluster, tier):
    other = RedisClusterTier(cluster.url, ttl_s=300, prefix=tier.prefix[:-1] + "-other:")
    try:
        tier.put_many({key(i): b"x" for i in range(600)})  # > one UNLINK batch
        other.put(key(0), b"y")
        assert count_under(cluster, tier.prefix) == 600
        tier.clear()
        assert count_under(cluster, tier.prefix) == 0
        assert other.get_many([key(0)]) == {key(0): b"y"}
    finally:
        other.clear()
        other.close()


def test_unreachable_cluster_is_a_miss_with_one_warning(caplog):
    tier = RedisClusterTier(
        f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/",
        ttl_s=60,
        retry_min_s=0.05,
        retry_max_s=0.1,
    )
    store = TieredStore(redis=tier, fingerprint=FP)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(5):
            store.put(key(1), make_entry(1))
            assert store.get_many([key(1)]) == {}
            store.clear()
            time.sleep(0.06)  # past the backoff: each round probes again
    assert len(tier_warnings(caplog)) == 1
    assert tier.is_up() is False
    assert store.stats()["tiers"]["redis"]["errors"] >= 2
    store.close()


# -- faults (each test its own cluster) ----------------------------------------------------


def test_killed_master_misses_only_its_chunks_then_the_failover_serves_them(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    with LocalCluster(masters=3, replicas=1) as cluster:
        tier = RedisClusterTier(
            cluster.url, ttl_s=300, retry_min_s=0.1, retry_max_s=0.5, refresh_s=0.2
        )
        store = TieredStore(redis=tier, fingerprint=FP)
        entries = {key(i): make_entry(i) for i in range(24)}
        store.put_many(entries)
        cluster.wait_replicated()
        victim = cluster.master_of(tier.prefix + key(0))
        on_victim = {k for k in entries if owner_port(cluster, tier, k) == victim.port}
        cluster.kill(victim)

        got = store.get_many(list(entries))  # before the cluster noticed: only its chunks miss
        assert set(got) == set(entries) - on_victim
        assert len(tier_warnings(caplog)) == 1 and victim.name in tier_warnings(caplog)[0].message
        assert tier.usage()["down"] == [victim.name]

        # Bounded: the replica takes over (~2 s at a 500 ms node timeout); the tier re-reads the
        # slot map on its own and serves the replicated values from the new master.
        wait_until(lambda: len(store.get_many(list(entries))) == len(entries), 30, "the failover")
        assert all(same(v, entries[k]) for k, v in store.get_many(list(entries)).items())
        assert len(tier_warnings(caplog)) == 1  # one outage, one warning
        usage = tier.usage()
        assert victim.name not in usage["masters"] and usage["up"] and usage["down"] == []
        assert any("no longer owns slots" in r.message for r in caplog.records if r.name == LOGGER)
        store.put(key(99), make_entry(99))  # writes land on the new master
        assert key(99) in store.get_many([key(99)])
        store.close()


def test_master_lost_without_replica_then_restarted(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    with LocalCluster(masters=3, replicas=0) as cluster:
        tier = RedisClusterTier(cluster.url, ttl_s=300, retry_min_s=0.05, retry_max_s=0.2)
        store = TieredStore(redis=tier, fingerprint=FP)
        entries = {key(i): make_entry(i) for i in range(24)}
        store.put_many(entries)
        victim = cluster.master_of(tier.prefix + key(0))
        on_victim = {k for k in entries if owner_port(cluster, tier, k) == victim.port}
        cluster.kill(victim)
        start = time.monotonic()
        for _ in range(20):  # a run of requests during the outage
            assert set(store.get_many(list(entries))) == set(entries) - on_victim
            store.put(key(50), make_entry(50))  # dropped if it maps to the victim, never raised
            time.sleep(0.02)
        assert time.monotonic() - start < 10  # no connect timeout per request
        assert len(tier_warnings(caplog)) == 1
        assert tier.is_up() is False and tier.usage()["down"] == [victim.name]

        cluster.restart(victim)  # same port and nodes.conf: it owns its slots again, empty
        wait_until(
            lambda: (store.put_many(entries), len(store.get_many(list(entries))))[1] == 24,
            30,
            "the restarted master",
        )
        assert len(tier_warnings(caplog)) == 1
        back = [r for r in caplog.records if r.name == LOGGER and "is back" in r.message]
        assert len(back) == 1 and back[0].levelno == logging.WARNING
        assert tier.usage()["up"]
        store.close()


def test_full_cluster_with_an_eviction_policy_evicts():
    with LocalCluster(masters=3, replicas=0, maxmemory="4mb", policy="allkeys-lru") as cluster:
        tier = RedisClusterTier(cluster.url, ttl_s=300)
        value = b"v" * 256_000
        written = [key(i) for i in range(120)]  # ~30 MB into 12 MB
        for i in range(0, len(written), 8):
            tier.put_many(dict.fromkeys(written[i : i + 8], value))
        counters = tier.stats.tier("redis")
        assert counters.writes == 120 and counters.errors == 0  # all accepted, older ones evicted
        evicted = sum(n.client().info("stats")["evicted_keys"] for n in cluster.masters())
        assert evicted > 0
        assert count_under(cluster, tier.prefix) < 120
        assert len(tier.get_many(written[-8:])) == 8  # the newest survive
        tier.close()


def test_noeviction_cluster_refusing_writes_serves_reads(caplog):
    with LocalCluster(masters=3, replicas=0, maxmemory="4mb", policy="noeviction") as cluster:
        tier = RedisClusterTier(cluster.url, ttl_s=300)
        store = TieredStore(redis=tier, fingerprint=FP)
        first = {key(i): make_entry(i) for i in range(4)}
        store.put_many(first)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            value = b"v" * 256_000
            for i in range(100, 160, 6):  # ~15 MB into 12 MB: writes get refused
                tier.put_many(dict.fromkeys((key(j) for j in range(i, i + 6)), value))
            assert set(store.get_many(list(first))) == set(first)  # reads go on at once
        counters = tier.stats.tier("redis")
        assert counters.errors > 0 and counters.writes < 4 + 60
        refusals = tier_warnings(caplog)
        assert 1 <= len(refusals) <= 3 and all("refuses writes" in r.message for r in refusals)
        assert tier.usage()["up"] and tier.usage()["down"] == []  # refusing is not down
        store.close()


# -- the benchmark's tier part ------------------------------------------------------------


def test_bench_tier_throughput_reads_the_same_values_from_both_and_cleans_up(cluster, tmp_path):
    from cache.redis_tier import DEFAULT_PREFIX
    from eval.bench_replicas import _tier_throughput, plot
    from eval.redis_local import LocalRedis

    served = RedisClusterTier(cluster.url, ttl_s=60, prefix=DEFAULT_PREFIX)  # what replicas write
    served.put_many({key(i): bytes([i]) * 200_000 for i in range(8)})
    try:
        with LocalRedis() as single:
            out = _tier_throughput(
                cluster.url, single.url, k=4, repeats=2, settle=cluster.wait_replicated
            )
            leftovers = list(single.node.client().scan_iter(match="kvrag:bench:*"))
        assert out["values"] == 8 and out["batches_timed"] == 4 and out["value_mb_mean"] == 0.2
        assert out["cluster_get_mb_s"] > 0 and out["single_get_mb_s"] > 0
        assert out["ratio_to_single"] == pytest.approx(
            out["cluster_get_mb_s"] / out["single_get_mb_s"], rel=0.01
        )
        assert leftovers == [] and count_under(cluster, "kvrag:bench:") == 0
    finally:
        served.clear()
        served.close()
    rows = [
        {"replica": "a", "ttft_ms": 10.0, "kv_hits": 4, "i": 0},
        {"replica": "b", "error": "x", "i": 1},
    ]
    result = {
        "ttft_ms_p50": {"shared": 5.0, "cold": 10.0},
        "speedup": 2.0,
        "ratio_to_single": 1.0,
        "single_get_mb_s": 1.0,
        "cluster_get_mb_s": 1.0,
        "kill": {"kill_before_request": 1, "failed": 1},
        "rows": {"shared": rows[:1], "cold": rows[:1], "kill": rows},
    }
    plot(result, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 10_000
