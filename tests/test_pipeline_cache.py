"""The RAG pipeline over the tiered store: hits, a Redis killed mid-service, corrupt values."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import redis

from ingest.job import ingest
from rag.pipeline import RAG
from tests.conftest import SAMPLES
from tests.redis_server import PrivateRedis

QUESTION = "What is the highest wind gust ever recorded in the islands?"


@pytest.fixture(scope="module")
def server():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not on PATH")
    s = PrivateRedis()
    s.start()
    yield s
    s.kill()


@pytest.fixture(scope="module")
def rag_with_redis(tmp_path_factory, models_dir, server):
    from rag.config import Settings

    root = tmp_path_factory.mktemp("pc")
    settings = Settings(data_dir=root / "data", model_cache_dir=models_dir, redis_url=server.url,
                        cache_disk_mb=0, cache_memory_mb=0)  # Redis is the only tier
    cwd = os.getcwd()
    os.chdir(root)
    try:
        ingest([SAMPLES], settings, progress=False)
    finally:
        os.chdir(cwd)
    return RAG(settings)


def ask(rag: RAG):
    return rag.answer(QUESTION, k=2, mode="blend", max_new_tokens=4)


def test_misses_are_computed_stored_then_hit(rag_with_redis, server):
    first = ask(rag_with_redis)
    assert first.cache["kv_misses"] == 2 and first.cache["kv_hits"] == 0
    rag_with_redis.store.flush()
    second = ask(rag_with_redis)
    assert second.cache["kv_hits"] == 2
    assert second.answer == first.answer
    keys = redis.Redis.from_url(server.url).keys("kvrag:kv:*")
    assert len(keys) == 2


def test_corrupt_value_is_recomputed_and_overwritten(rag_with_redis, server):
    ask(rag_with_redis)
    rag_with_redis.store.flush()
    client = redis.Redis.from_url(server.url)
    key = sorted(client.keys("kvrag:kv:*"))[0]
    good = client.get(key)
    client.set(key, good[:-100])  # truncated
    again = ask(rag_with_redis)
    assert again.cache["kv_misses"] == 1
    rag_with_redis.store.flush()
    assert client.get(key) == good  # recomputed and written back, identical bytes


def test_dead_redis_degrades_to_recompute_then_reconnects(rag_with_redis, server, caplog):
    baseline = ask(rag_with_redis)
    server.kill()
    dead = ask(rag_with_redis)  # must not raise
    assert dead.cache["kv_misses"] == 2 and dead.answer == baseline.answer
    ask(rag_with_redis)
    warnings = [r for r in caplog.records if r.name.startswith("cache") and r.levelname == "WARNING"]
    assert len(warnings) <= 1
    server.start()  # same port, empty: the store reconnects after its back-off
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ans = ask(rag_with_redis)
        rag_with_redis.store.flush()
        if ans.cache["kv_hits"] == 2:
            break
        time.sleep(1)
    assert ans.cache["kv_hits"] == 2
