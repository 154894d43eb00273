"""A lying, dead or hung Redis never fails a request: a live server over a private redis-server.

The server keeps no memory or disk tier, so every chunk K/V it reuses is read back from Redis.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import httpx
import pytest
import redis

from cache.redis_tier import DEFAULT_PREFIX
from cache.serde import CorruptEntry, loads, peek_header
from tests.faults import chat, ingested, settings_for, thread_server

# Red and blue are the same number of tokens: swapped, each still fits the other's slot.
DOCS = {
    "red.md": "The code of the red door is 4417. The red door opens the boat shed.",
    "blue.md": "The code of the blue door is 9902. The blue door opens the boat shed.",
    "green.md": "The green door has no code at all. It is never locked, and behind it the "
    "harbour master keeps the tide tables, the spare lamps and a very old brass bell.",
}
RED, BLUE, GREEN = (
    "What is the code of the red door?",
    "What is the code of the blue door?",
    "What is behind the green door?",
)
ONE = {"kvrag": {"k": 1, "mode": "reuse"}, "max_tokens": 12}


@pytest.fixture(scope="module")
def server(tmp_path_factory, module_private_redis):
    root = tmp_path_factory.mktemp("redis_faults")
    ingested(root, DOCS)
    settings = settings_for(
        root / "data", redis_url=module_private_redis.url, cache_memory_mb=0, cache_disk_mb=0
    )
    with thread_server(settings) as (url, rag):
        client = redis.Redis(port=module_private_redis.port)
        yield url, rag, client, module_private_redis
        client.close()


def answer(url: str, question: str) -> str:
    r = chat(url, question, **ONE)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def stored(client: redis.Redis) -> dict[str, bytes]:
    keys = client.keys(DEFAULT_PREFIX + "*")
    return {k.decode()[len(DEFAULT_PREFIX) :]: client.get(k) for k in keys}


def test_swapped_values_are_corrupt_misses_recomputed_and_overwritten(server):
    url, rag, client, _ = server
    client.flushdb()
    red, blue = answer(url, RED), answer(url, BLUE)
    assert answer(url, RED) == red  # served from Redis, same answer
    values = stored(client)
    assert len(values) == 2
    (k1, v1), (k2, v2) = values.items()
    assert peek_header(v1)["n_tokens"] == peek_header(v2)["n_tokens"]
    client.set(DEFAULT_PREFIX + k1, v2)
    client.set(DEFAULT_PREFIX + k2, v1)
    corrupt = rag.cache_stats()["corrupt"]
    assert answer(url, RED) == red and answer(url, BLUE) == blue
    assert rag.cache_stats()["corrupt"] == corrupt + 2
    metrics = httpx.get(f"{url}/metrics").text
    assert f'kvrag_cache_corrupt_total{{tier="redis"}} {corrupt + 2}.0' in metrics
    for key, value in stored(client).items():  # recomputed and written back under their keys
        loads(value, rag.store.fingerprint, expected_key=key)


def test_value_of_another_length_under_a_key_is_recomputed(server):
    url, rag, client, _ = server
    client.flushdb()
    red, green = answer(url, RED), answer(url, GREEN)
    values = stored(client)
    lengths = {k: peek_header(v)["n_tokens"] for k, v in values.items()}
    assert len(set(lengths.values())) == 2
    (k1, v1), (k2, v2) = values.items()
    client.set(DEFAULT_PREFIX + k1, v2)
    client.set(DEFAULT_PREFIX + k2, v1)
    assert answer(url, RED) == red and answer(url, GREEN) == green
    for key, value in stored(client).items():
        loads(value, rag.store.fingerprint, expected_key=key)


def test_old_format_values_read_as_corrupt_misses(server):
    url, rag, client, _ = server
    client.flushdb()
    red = answer(url, RED)
    ((key, value),) = stored(client).items()
    old = bytearray(value)
    old[4:6] = (2).to_bytes(2, "little")  # format version 2: no key in the header
    client.set(DEFAULT_PREFIX + key, bytes(old))
    with pytest.raises(CorruptEntry, match="format version 2"):
        loads(bytes(old), rag.store.fingerprint)
    assert answer(url, RED) == red
    loads(stored(client)[key], rag.store.fingerprint, expected_key=key)


def test_killed_redis_degrades_to_recompute_and_recovery_is_logged(server, caplog):
    url, rag, client, private = server
    red = answer(url, RED)
    private.kill()
    try:
        assert answer(url, RED) == red
        assert rag.redis_state() == "down"
    finally:
        private.start()
    caplog.set_level(logging.INFO, logger="cache.redis_tier")
    deadline = time.monotonic() + 30
    while rag.redis_state() != "up" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert rag.redis_state() == "up"
    back = [r for r in caplog.records if "is back" in r.getMessage()]
    assert back and back[0].levelno == logging.WARNING  # seen at the default log level
    assert answer(url, RED) == red


def test_hung_redis_is_bounded_then_a_miss(server):
    url, rag, client, private = server
    red = answer(url, RED)
    errors = rag.cache_stats()["tiers"]["redis"]["errors"]
    os.kill(private.proc.pid, signal.SIGSTOP)
    try:
        # A stopped server accepts connections and never answers: the tier gives up after its
        # socket timeout (no retry on a timeout), the chunk is computed, Redis is marked down.
        assert answer(url, RED) == red
        assert rag.cache_stats()["tiers"]["redis"]["errors"] > errors
        assert rag.redis_state() == "down"
        assert answer(url, RED) == red  # skips Redis while it backs off
    finally:
        os.kill(private.proc.pid, signal.SIGCONT)
