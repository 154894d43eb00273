"""API replicas on loopback: N `kvrag serve` processes over one data dir and one KV tier.

What a fleet of API containers is, minus the containers: each replica is its own process with
its own model, on its own port; they share the index (the data dir, which they only read) and
the chunk-KV tier (KVRAG_REDIS_URL). Used by tests/test_replicas.py and `kvrag bench replicas`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from rag.server.run import free_port


@dataclass
class Replica:
    name: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def chat(
        self,
        question: str,
        *,
        k: int = 4,
        max_tokens: int = 4,
        mode: str = "blend",
        timeout_s: float = 300,
    ) -> httpx.Response:
        body = {
            "model": "kvrag",
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "kvrag": {"k": k, "mode": mode},
        }
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=timeout_s)

    def retrieve(self, query: str, k: int = 3) -> list[dict]:
        r = httpx.post(f"{self.url}/v1/retrieve", json={"query": query, "k": k}, timeout=60)
        r.raise_for_status()
        return r.json()["data"]

    def cache_counts(self) -> dict[str, dict[str, float]]:
        """This replica's /metrics chunk-cache counters: {tier: {"hits": n, "misses": n}}."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        out: dict[str, dict[str, float]] = {}
        for family in text_string_to_metric_families(text):
            if family.name in ("kvrag_cache_hits", "kvrag_cache_misses"):
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        kind = "hits" if family.name == "kvrag_cache_hits" else "misses"
                        out.setdefault(sample.labels["tier"], {})[kind] = sample.value
        return out

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def replica_env(
    data_dir: Path,
    redis_url: str,
    state_dir: Path,
    name: str,
    models_dir: Path,
    *,
    memory_mb: int = 0,
    threads: int = 1,
) -> dict[str, str]:
    """The environment of one replica: the shared data dir and KV tier, the converted model
    outside the data dir, no per-replica disk tier, and its cache-stats file outside the data
    dir too (which it only reads)."""
    return {
        **os.environ,
        "KVRAG_DATA_DIR": str(data_dir),
        "KVRAG_REDIS_URL": redis_url,
        "KVRAG_MODEL_CACHE_DIR": str(models_dir),
        "KVRAG_CACHE_DISK_MB": "0",
        "KVRAG_CACHE_MEMORY_MB": str(memory_mb),
        "KVRAG_CACHE_STATS_FILE": str(state_dir / f"cache_stats-{name}.json"),
        "KVRAG_THREADS": str(threads),
        "KVRAG_API_KEYS": "",
    }


@contextlib.contextmanager
def serve_replicas(
    redis_urls: Sequence[str],
    data_dir: Path,
    state_dir: Path,
    models_dir: Path,
    *,
    memory_mb: int = 0,
    threads: int = 1,
    startup_timeout_s: float = 600,
) -> Iterator[list[Replica]]:
    """One replica per entry of redis_urls (its KVRAG_REDIS_URL; "" = no shared tier), named a, b,
    c, ...; all start at once; waits until every one answers /healthz; stops them all on exit."""
    state_dir.mkdir(parents=True, exist_ok=True)
    replicas: list[Replica] = []
    try:
        for i, redis_url in enumerate(redis_urls):
            name, port = chr(ord("a") + i), free_port()
            log_path = state_dir / f"replica-{name}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "rag.cli",
                        "serve",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--log-level",
                        "warning",
                    ],
                    env=replica_env(
                        data_dir,
                        redis_url,
                        state_dir,
                        name,
                        models_dir,
                        memory_mb=memory_mb,
                        threads=threads,
                    ),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            replicas.append(Replica(name, port, proc, log_path))
        deadline = time.monotonic() + startup_timeout_s
        for r in replicas:
            while True:
                if r.proc.poll() is not None:
                    raise RuntimeError(
                        f"replica {r.name} exited with {r.proc.returncode}:\n{r.log_text()[-3000:]}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{r.url}/healthz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"replica {r.name} did not become healthy")
                time.sleep(0.25)
        yield replicas
    finally:
        for r in replicas:
            if r.proc.poll() is None:
                r.proc.terminate()
        for r in replicas:
            try:
                r.proc.wait(30)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait(10)
