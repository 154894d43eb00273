"""`kvrag bench replicas`: API replicas sharing a Redis Cluster KV tier, on loopback.

Starts a 3-master Redis Cluster with a replica per master (or uses --redis-url), ingests the
documents (default samples/) into a temporary data dir, and serves it from `--replicas`
processes sharing the cluster (a = the one that computes, b, ... = readers) plus one `cold`
process with no shared tier. None of them has a memory or disk tier, so every chunk a reader
uses comes from the cluster and every chunk the cold one uses is computed. Three parts:

1. Shared work: for each of `--requests` questions, replica a answers first (computing and
   storing the chunks it misses), then each reader and the cold replica answer the same
   question, in alternating order. `ttft_ms_p50.shared` is the readers' TTFT, `.cold` the
   cold replica's, both as the servers report it (retrieval, K/V load or compute, blend, first
   token); `speedup` = cold / shared.
2. Tier throughput: the chunk values the replicas stored, read in batches of k through the
   cluster tier (one pipeline per master) and through the single-node tier (one MGET) of a
   loopback redis-server holding the same values, interleaved; MB/s medians, `ratio_to_single`.
3. A master killed: `--requests` more requests alternating over the replicas, one master
   SIGKILLed after the first third (own cluster only). `failed_requests` counts every request
   of the run that did not come back 200.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from eval.bench_load import percentile
from eval.redis_local import LocalCluster, LocalRedis, have_redis_server
from eval.replicas import Replica, serve_replicas
from eval.samples import SAMPLE_QUESTIONS, SAMPLES
from rag.config import Settings


def _ask(replica: Replica, question: str, k: int, max_tokens: int) -> dict:
    """One chat completion; the server's TTFT and cache counts, or the error."""
    t0 = time.perf_counter()
    try:
        r = replica.chat(question, k=k, max_tokens=max_tokens)
    except Exception as e:  # a dropped connection is a failed request, not a crashed benchmark
        return {"replica": replica.name, "error": f"{type(e).__name__}: {e}"}
    wall_ms = 1000 * (time.perf_counter() - t0)
    if r.status_code != 200:
        return {"replica": replica.name, "error": f"HTTP {r.status_code}: {r.text[:200]}"}
    info = r.json()["kvrag"]
    return {
        "replica": replica.name,
        "ttft_ms": info["timings_ms"]["ttft"],
        "wall_ms": round(wall_ms, 1),
        "kv_hits": info["cache"]["kv_hits"],
        "kv_misses": info["cache"]["kv_misses"],
    }


def _shared_vs_cold(
    writer: Replica,
    readers: list[Replica],
    cold: Replica,
    questions: list[str],
    k: int,
    max_tokens: int,
) -> dict:
    rows: dict[str, list[dict]] = {"writer": [], "shared": [], "cold": []}
    for i, q in enumerate(tqdm(questions, desc="shared vs cold", unit="question")):
        rows["writer"].append(_ask(writer, q, k, max_tokens))
        order = [("shared", r) for r in readers] + [("cold", cold)]
        for kind, replica in order if i % 2 == 0 else order[::-1]:  # neither always goes first
            rows[kind].append(_ask(replica, q, k, max_tokens))
    return rows


def _p50(rows: list[dict]) -> float | None:
    ttfts = [r["ttft_ms"] for r in rows if "ttft_ms" in r]
    return round(percentile(ttfts, 50), 1) if ttfts else None


def _tier_throughput(
    cluster_url: str,
    single_url: str,
    k: int,
    repeats: int,
    settle: Callable[[], None] = lambda: None,
    max_values: int = 24,
) -> dict:
    """Batched get MB/s of the cluster tier and the single-node tier on the same chunk values.
    `settle` runs after the copies are written (the own cluster waits for its replicas to catch
    up, so replication traffic does not share the CPU with the timed reads)."""
    from redis.cluster import ClusterNode, RedisCluster

    from cache.cluster_tier import RedisClusterTier
    from cache.cluster_url import parse_cluster_url
    from cache.redis_tier import DEFAULT_PREFIX, RedisTier

    nodes, options = parse_cluster_url(cluster_url)
    source = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], **options)
    try:
        names = list(
            source.scan_iter(
                match=DEFAULT_PREFIX + "*", count=1000, target_nodes=RedisCluster.PRIMARIES
            )
        )[:max_values]
        values = {n.decode()[len(DEFAULT_PREFIX) :]: source.get(n) for n in names}
    finally:
        source.close()
    values = {key: v for key, v in values.items() if v}
    if len(values) < k:
        return {"error": f"only {len(values)} chunk values in the cluster"}
    prefix = f"kvrag:bench:{uuid.uuid4().hex}:"
    cluster = RedisClusterTier(cluster_url, ttl_s=600, prefix=prefix)
    single = RedisTier(single_url, ttl_s=600, prefix=prefix)
    try:
        cluster.put_many(values)
        single.put_many(values)
        settle()
        keys = list(values)
        batches = [keys[i : i + k] for i in range(0, len(keys) - k + 1, k)]
        mb_s: dict[str, list[float]] = {"cluster": [], "single": []}
        for rep in range(repeats):
            for batch in batches:
                pair = [("cluster", cluster), ("single", single)]
                for name, tier in pair if rep % 2 == 0 else pair[::-1]:
                    t0 = time.perf_counter()
                    got = tier.get_many(batch)
                    dt = time.perf_counter() - t0
                    if len(got) != len(batch):
                        return {"error": f"{name} tier lost values during the benchmark"}
                    mb_s[name].append(sum(len(v) for v in got.values()) / 1e6 / dt)
        c, s = statistics.median(mb_s["cluster"]), statistics.median(mb_s["single"])
        return {
            "cluster_get_mb_s": round(c, 1),
            "single_get_mb_s": round(s, 1),
            "ratio_to_single": round(c / s, 3),
            "values": len(values),
            "value_mb_mean": round(statistics.mean(len(v) for v in values.values()) / 1e6, 2),
            "batch": k,
            "batches_timed": len(mb_s["cluster"]),
        }
    finally:
        cluster.clear()
        single.clear()
        cluster.close()
        single.close()


def _kill_run(
    replicas: list[Replica],
    cluster: LocalCluster | None,
    questions: list[str],
    k: int,
    max_tokens: int,
) -> dict:
    """Requests round-robin over the replicas; one master SIGKILLed before the first third.
    A watcher thread times the failover (kill -> a replica owns the slots, cluster ok)."""
    kill_at = len(questions) // 3 if cluster is not None else None
    victim, watcher, failover = None, None, {}
    rows = []
    for i, q in enumerate(tqdm(questions, desc="master killed", unit="request")):
        if i == kill_at:
            cluster.wait_replicated()
            victim = cluster.masters()[0]
            cluster.kill(victim)
            killed_at = time.monotonic()

            def watch(dead=victim, t0=killed_at) -> None:
                failover["new_master"] = cluster.wait_failover(dead).name
                failover["failover_s"] = round(time.monotonic() - t0, 2)

            watcher = threading.Thread(target=watch, name="failover-watch", daemon=True)
            watcher.start()
        rows.append({**_ask(replicas[i % len(replicas)], q, k, max_tokens), "i": i})
    if watcher is not None:
        watcher.join(60)
    out: dict = {
        "requests": len(rows),
        "failed": sum("error" in r for r in rows),
        "rows": rows,
        "killed": victim.name if victim else None,
        "kill_before_request": kill_at,
        **failover,
    }
    if kill_at is not None:  # from which request on every chunk was a hit again
        partial = [r["i"] for r in rows[kill_at:] if r.get("kv_hits") != k]
        out["requests_with_misses_after_kill"] = len(partial)
        out["all_hits_again_from_request"] = partial[-1] + 1 if partial else kill_at
    if out["failed"]:
        out["first_error"] = next(r["error"] for r in rows if "error" in r)
    return out


def _warnings(replica: Replica) -> list[str]:
    return [line for line in replica.log_text().splitlines() if line.startswith("WARNING cache.")]


def run_replicas_bench(
    settings: Settings,
    replicas: int = 2,
    requests: int = 24,
    k: int = 4,
    max_tokens: int = 4,
    redis_url: str | None = None,
    docs: list[Path] | None = None,
    repeats: int = 10,
    kill: bool = True,
) -> dict:
    from ingest.job import ingest

    if replicas < 2:
        raise ValueError("--replicas must be at least 2 (one computes, the others read)")
    if redis_url is None and not have_redis_server():
        raise RuntimeError(
            "redis-server / redis-cli not on PATH: install Redis, or pass --redis-url"
        )
    questions = [SAMPLE_QUESTIONS[i % len(SAMPLE_QUESTIONS)] for i in range(requests)]
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvrag-replicas-")))
        run_settings = settings.model_copy(
            update={"data_dir": root / "data", "model_cache_dir": settings.models_dir.resolve()}
        )
        cwd = os.getcwd()
        os.chdir(root)  # doc ids relative to the run dir
        try:
            ingest([Path(p).resolve() for p in (docs or [SAMPLES])], run_settings, progress=False)
        finally:
            os.chdir(cwd)
        cluster = None
        if redis_url is None:
            cluster = stack.enter_context(LocalCluster(masters=3, replicas=1))
            redis_url = cluster.url
        fleet = stack.enter_context(  # the last one has no shared tier: the cold baseline
            serve_replicas(
                [redis_url] * replicas + [""],
                run_settings.data_dir,
                root / "state",
                run_settings.models_dir,
            )
        )
        *shared, cold = fleet
        writer, readers = shared[0], shared[1:]
        rows = _shared_vs_cold(writer, readers, cold, questions, k, max_tokens)
        shared_p50, cold_p50 = _p50(rows["shared"]), _p50(rows["cold"])
        reader_hits = sum(r.get("kv_hits", 0) for r in rows["shared"])
        reader_chunks = reader_hits + sum(r.get("kv_misses", 0) for r in rows["shared"])
        throughput: dict = {"error": "redis-server not on PATH"}
        if have_redis_server():
            single = stack.enter_context(LocalRedis())
            throughput = _tier_throughput(
                redis_url,
                single.url,
                k,
                repeats,
                cluster.wait_replicated if cluster else lambda: None,
            )
        killed = _kill_run(shared, cluster if kill else None, questions, k, max_tokens)
        warnings = {r.name: _warnings(r) for r in fleet}
    failed = killed["failed"] + sum("error" in r for rs in rows.values() for r in rs)
    return {
        "replicas": replicas,
        "requests": requests,
        "k": k,
        "max_tokens": max_tokens,
        "ttft_ms_p50": {"shared": shared_p50, "cold": cold_p50, "writer": _p50(rows["writer"])},
        "speedup": round(cold_p50 / shared_p50, 2) if shared_p50 and cold_p50 else None,
        "reader_hit_rate": round(reader_hits / reader_chunks, 4) if reader_chunks else None,
        "cluster_get_mb_s": throughput.get("cluster_get_mb_s"),
        "single_get_mb_s": throughput.get("single_get_mb_s"),
        "ratio_to_single": throughput.get("ratio_to_single"),
        "failed_requests": failed,
        "throughput": throughput,
        "kill": {key: v for key, v in killed.items() if key != "rows"},
        "cluster": "own loopback cluster, 3 masters + 3 replicas" if cluster else "--redis-url",
        "warnings": warnings,
        "rows": {**rows, "kill": killed["rows"]},
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(
        1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [3, 1, 3]}
    )
    for kind, color in (("cold", "tab:red"), ("shared", "tab:green")):
        ys = [r.get("ttft_ms") for r in result["rows"][kind]]
        ax1.plot(
            range(len(ys)),
            ys,
            "o-",
            color=color,
            ms=3,
            label=f"{kind}: p50 {result['ttft_ms_p50'][kind]} ms",
        )
    ax1.set(
        xlabel="question",
        ylabel="server TTFT (ms)",
        ylim=(0, None),
        title=f"Reader on the writer's chunks vs cold: {result['speedup']}x",
    )
    ax1.legend()
    values = [result["single_get_mb_s"] or 0, result["cluster_get_mb_s"] or 0]
    ax2.bar(["single node", "cluster"], values, color=["tab:gray", "tab:blue"])
    ax2.set(ylabel="batched get MB/s", title=f"Tier reads: {result['ratio_to_single']}x")
    kill = result["rows"]["kill"]
    for name in sorted({r["replica"] for r in kill}):
        pts = [(r["i"], r.get("ttft_ms", 0)) for r in kill if r["replica"] == name]
        ax3.plot(*zip(*pts, strict=True), "o", ms=4, label=f"replica {name}")
    for r in kill:
        if "kv_hits" in r:
            ax3.annotate(
                str(r["kv_hits"]),
                (r["i"], r["ttft_ms"]),
                fontsize=7,
                xytext=(0, 4),
                textcoords="offset points",
                ha="center",
            )
        else:
            ax3.axvline(r["i"], color="red", lw=2)
    if result["kill"].get("kill_before_request") is not None:
        ax3.axvline(
            result["kill"]["kill_before_request"] - 0.5,
            color="black",
            ls="--",
            label="master killed",
        )
    ax3.set(
        xlabel="request",
        ylabel="server TTFT (ms)",
        ylim=(0, None),
        title=f"Master killed: {result['kill']['failed']} failed (labels: chunks hit)",
    )
    ax3.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_bench_replicas_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of `kvrag bench replicas [--replicas 2] [--requests 24] [--json OUT]`."""
    p.add_argument(
        "--replicas", type=int, default=2, help="API processes sharing the KV tier (>= 2)"
    )
    p.add_argument(
        "--requests", type=int, default=24, help="questions per part (shared/cold, kill run)"
    )
    p.add_argument("--k", type=int, default=4, help="chunks per prompt")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument(
        "--redis-url",
        default=None,
        help="use this cluster, redis+cluster://host:port,... (then no master is "
        "killed); default: start one on loopback",
    )
    p.add_argument(
        "--docs", type=Path, nargs="+", default=None, help="documents to serve (default samples/)"
    )
    p.add_argument(
        "--repeats", type=int, default=10, help="passes over the values in the throughput part"
    )
    p.add_argument("--no-kill", action="store_true", help="skip killing a master")
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="OUT.json",
        help="write the result here, and the plot beside it (OUT.png)",
    )
    return p


def cmd_bench_replicas(args: argparse.Namespace, settings: Settings | None = None) -> int:
    result = run_replicas_bench(
        settings or Settings(),
        replicas=args.replicas,
        requests=args.requests,
        k=args.k,
        max_tokens=args.max_tokens,
        redis_url=args.redis_url,
        docs=args.docs,
        repeats=args.repeats,
        kill=not args.no_kill,
    )
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
        plot(result, args.json.with_suffix(".png"))
    print(json.dumps({key: v for key, v in result.items() if key != "rows"}, indent=2))
    return 1 if result["failed_requests"] else 0
