"""The RAG pipeline over the tiered store: hits, a Redis killed mid-service, corrupt values."""

from __future__ import annotations

import json
import os
import time

import pytest
import redis
import torch

from ingest.job import ingest
from rag.cli import main
from rag.engine.request import GenerationParams, Request
from rag.service import RAGService
from tests.conftest import SAMPLES

QUESTION = "What is the highest wind gust ever recorded in the islands?"


@pytest.fixture(scope="module")
def server(module_private_redis):
    return module_private_redis


@pytest.fixture(scope="module")
def rag_with_redis(tmp_path_factory, models_dir, server):
    from rag.config import Settings

    root = tmp_path_factory.mktemp("pc")
    settings = Settings(
        data_dir=root / "data",
        model_cache_dir=models_dir,
        redis_url=server.url,
        cache_disk_mb=0,
        cache_memory_mb=0,
    )  # Redis is the only tier
    cwd = os.getcwd()
    os.chdir(root)
    try:
        ingest([SAMPLES], settings, progress=False)
    finally:
        os.chdir(cwd)
    return RAGService(settings)


def ask(rag: RAGService):
    return rag.answer(QUESTION, k=2, mode="blend", params=GenerationParams(max_new_tokens=4))


def test_misses_are_computed_stored_then_hit(rag_with_redis, server):
    first = ask(rag_with_redis)
    assert first.request.chunk_misses == 2 and first.request.chunk_hits == 0
    assert first.request.cache_report()["tiers"]["redis"] == {"hits": 0, "misses": 2}
    rag_with_redis.store.flush()
    second = ask(rag_with_redis)
    assert second.request.chunk_hits == 2
    assert second.request.cache_report()["tiers"]["redis"] == {"hits": 2, "misses": 0}
    assert second.text == first.text
    keys = redis.Redis.from_url(server.url).keys("kvrag:kv:*")
    assert len(keys) == 2


def test_streamed_loads_keep_order_compute_misses_and_match_a_list(rag_with_redis):
    """Engine.chunk_kvs: every load starts at once, chunks come back in prompt order as they land,
    a miss is computed and then stored; the blend over the stream equals the blend over a list."""
    engine, store = rag_with_redis.engine, rag_with_redis.store
    hits = rag_with_redis.retrieve(QUESTION, 3)
    prompt = engine.prompts.build([h.chunk.text for h in hits], QUESTION)
    keys = [engine.chunk_key(ids) for ids in prompt.chunks]
    exact = [engine.chunk_kv(ids) for ids in prompt.chunks]
    for k in keys:
        store.delete(k)
    store.put_many({keys[0]: exact[0], keys[2]: exact[2]})
    store.flush()
    request = Request()
    streamed = list(engine.chunk_kvs(prompt, request))
    assert request.chunk_hits == 2 and request.chunk_misses == 1 and request.store.wait_ms >= 0
    for got, want in zip(streamed, exact, strict=True):
        assert torch.equal(got.k, want.k) and torch.equal(got.v, want.v)
    store.flush()
    assert set(store.get_many(keys)) == set(keys)  # the miss was written back
    a = engine.prefill(prompt, "blend", 0.15, engine.chunk_kvs(prompt, Request()))
    b = engine.prefill(prompt, "blend", 0.15, exact)
    assert torch.equal(a.logits, b.logits)


def test_kvrag_stats_shows_traffic_of_earlier_processes(rag_with_redis, capsys):
    ask(rag_with_redis)
    ask(rag_with_redis)
    # what closing the process does (answers write every few seconds)
    rag_with_redis.store.persist_stats()
    main(["--data-dir", str(rag_with_redis.settings.data_dir), "stats", "--json"])
    kv = json.loads(capsys.readouterr().out)["kv_cache"]
    assert kv["tiers"]["redis"]["hits"] >= 2 and kv["tiers"]["redis"]["bytes_read"] > 0
    assert kv["load_ms"]["count"] >= 2 and kv["load_ms"]["mean_ms"] > 0


def test_corrupt_value_is_recomputed_and_overwritten(rag_with_redis, server):
    ask(rag_with_redis)
    rag_with_redis.store.flush()
    client = redis.Redis.from_url(server.url)
    engine = rag_with_redis.engine
    hits = rag_with_redis.retrieve(QUESTION, 2)  # what ask() reads (other tests store other chunks)
    chunk = engine.prompts.build([h.chunk.text for h in hits], QUESTION).chunks[0]
    key = f"kvrag:kv:{engine.chunk_key(chunk)}".encode()
    good = client.get(key)
    client.set(key, good[:-100])  # truncated
    again = ask(rag_with_redis)
    assert again.request.chunk_misses == 1
    rag_with_redis.store.flush()
    assert client.get(key) == good  # recomputed and written back, identical bytes


def test_dead_redis_degrades_to_recompute_then_reconnects(rag_with_redis, server, caplog):
    baseline = ask(rag_with_redis)
    server.kill()
    dead = ask(rag_with_redis)  # must not raise
    assert dead.request.chunk_misses == 2 and dead.text == baseline.text
    ask(rag_with_redis)
    warnings = [
        r for r in caplog.records if r.name.startswith("cache") and r.levelname == "WARNING"
    ]
    assert len(warnings) <= 1
    server.start()  # same port, empty: the store reconnects after its back-off
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ans = ask(rag_with_redis)
        rag_with_redis.store.flush()
        if ans.request.chunk_hits == 2:
            break
        time.sleep(1)
    assert ans.request.chunk_hits == 2
