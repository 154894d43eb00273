"""Two `kvrag serve` processes over one data dir and one Redis Cluster (3 masters + 3 replicas on
loopback): work computed by one replica is a hit for the other, an ingestion is picked up by
both, the data dir is only read, and a master killed mid-run fails no request."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from eval.redis_local import LocalCluster, have_redis_server
from eval.replicas import serve_replicas
from tests.conftest import SAMPLES

pytestmark = pytest.mark.skipif(
    not have_redis_server(), reason="redis-server / redis-cli not on PATH"
)

K = 2
QUESTIONS = (
    "How tall is the Greywater Point lighthouse?",
    "What is the light characteristic of Skerra Rock Lighthouse?",
    "What is the highest wind gust ever recorded in the Saltmere Islands?",
    "Who founded the Saltmere Coastal Weather Service, and in what year?",
    "When was the Greywater Point station automated?",
    "Who was the first principal keeper of Greywater Point?",
)
NEW_FACT = (
    "The Orrin Shoal beacon was painted vermilion and ultramarine in 1931 by Edda Quillfeather."
)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root: size and mtime (what a writer would change)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
    }


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, models_dir):
    from ingest.job import ingest
    from rag.config import Settings

    root = tmp_path_factory.mktemp("replicas")
    docs = root / "docs"
    docs.mkdir()
    for name in ("saltmere_lighthouses.md", "saltmere_weather.md"):
        shutil.copy(SAMPLES / name, docs / name)
    settings = Settings(data_dir=root / "data", model_cache_dir=models_dir)
    cwd = os.getcwd()
    os.chdir(root)  # doc ids are paths relative to the working dir: docs/<file>
    try:
        ingest([Path("docs")], settings, progress=False)
    finally:
        os.chdir(cwd)
    before = snapshot(settings.data_dir)
    with (
        LocalCluster(masters=3, replicas=1) as cluster,
        serve_replicas([cluster.url] * 2, settings.data_dir, root / "state", models_dir) as (a, b),
    ):
        yield {
            "a": a,
            "b": b,
            "cluster": cluster,
            "settings": settings,
            "root": root,
            "before": before,
        }


def ok(response) -> dict:
    assert response.status_code == 200, response.text[:500]
    return response.json()


def test_a_chunk_computed_by_one_replica_is_a_hit_for_the_other(deployment):
    a, b = deployment["a"], deployment["b"]
    first = ok(a.chat(QUESTIONS[0], k=K))["kvrag"]["cache"]
    assert first["kv_misses"] == K and first["kv_hits"] == 0  # A computed both chunks
    second = ok(b.chat(QUESTIONS[0], k=K))
    cache = second["kvrag"]["cache"]
    assert cache["kv_hits"] == K and cache["kv_misses"] == 0  # B loaded A's work
    assert cache["tiers"]["redis"] == {"hits": K, "misses": 0}
    assert b.cache_counts()["redis"] == {"hits": K, "misses": 0}  # B's /metrics show it
    assert a.cache_counts()["redis"] == {"hits": 0, "misses": K}
    # Same bits either way: B's answer is A's answer.
    again = ok(a.chat(QUESTIONS[0], k=K))
    assert second["choices"][0]["message"]["content"] == again["choices"][0]["message"]["content"]


def test_replicas_write_nothing_to_the_data_dir(deployment):
    a, b = deployment["a"], deployment["b"]
    for replica in (a, b):
        ok(replica.chat(QUESTIONS[1], k=K))
    assert snapshot(deployment["settings"].data_dir) == deployment["before"]


def test_an_ingestion_committed_while_both_serve_is_picked_up_by_both(deployment):
    from ingest.job import ingest

    a, b, root = deployment["a"], deployment["b"], deployment["root"]
    assert all("orrin" not in h["text"].lower() for h in a.retrieve("Orrin Shoal beacon colours"))
    (root / "docs" / "orrin.md").write_text(f"# Orrin Shoal\n\n{NEW_FACT}\n", encoding="utf-8")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        ingest([Path("docs/orrin.md")], deployment["settings"], progress=False)  # a separate writer
    finally:
        os.chdir(cwd)
    for replica in (a, b):
        top = replica.retrieve("What colours was the Orrin Shoal beacon painted?", k=1)[0]
        assert top["doc_id"] == "docs/orrin.md" and "vermilion" in top["text"]
        answer = ok(replica.chat("Who painted the Orrin Shoal beacon?", k=1))
        assert answer["kvrag"]["citations"][0]["doc_id"] == "docs/orrin.md"


def test_killing_a_master_mid_run_fails_no_request(deployment):
    a, b, cluster = deployment["a"], deployment["b"], deployment["cluster"]
    cluster.wait_replicated()
    victim = cluster.masters()[0]
    statuses, hits = [], []
    for i in range(12):  # a bounded run, alternating replicas; the master dies after the 4th
        if i == 4:
            cluster.kill(victim)
        replica = (a, b)[i % 2]
        r = replica.chat(QUESTIONS[i % len(QUESTIONS)], k=K)
        statuses.append(r.status_code)
        if r.status_code == 200:
            hits.append(r.json()["kvrag"]["cache"]["kv_hits"])
    assert statuses == [200] * 12, [r for r in statuses if r != 200]
    assert sum(hits[6:]) > 0  # repeated questions: the two live masters kept serving their chunks
    cluster.wait_failover(victim)
    # Once the replica took over, both servers read every chunk from the tier again (bounded).
    deadline = time.monotonic() + 60
    for replica in (a, b):
        while True:
            cache = ok(replica.chat(QUESTIONS[0], k=K))["kvrag"]["cache"]
            if cache["kv_hits"] == K:
                break
            assert time.monotonic() < deadline, f"replica {replica.name} never saw the new topology"
            time.sleep(0.5)
    for replica in (a, b):  # at most one warning per replica for the one lost node
        warnings = [
            line
            for line in replica.log_text().splitlines()
            if line.startswith("WARNING cache.cluster_tier")
        ]
        assert len(warnings) <= 1, warnings
        assert "Traceback" not in replica.log_text()
