"""`kvrag bench cache`: per-tier load speed, and time to first token by where the
chunk K/V come from.

TTFT here is everything after retrieval: fetch the k chunk caches from one tier
(or compute them on a miss), blend, choose the first token. `full_prefill` is
the same prompt prefilled in full. `ttft_ms` is the engine's path, where the
loads stream in while earlier chunks are stitched (rag/kv_stream.py);
`ttft_ms_sequential` loads all chunks first, then blends; `kv_load_ms` is the
load alone (one get_many of the k chunks) and `kv_wait_ms_streamed` the part of
it the streamed path still waited for (the rest was hidden behind its work).
Cases run interleaved, so machine
noise hits all of them alike; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from cache.bench import bench_tiers
from cache.disk_tier import DiskTier
from cache.memory_tier import MemoryTier
from cache.redis_tier import RedisTier
from cache.store import TieredStore
from rag.config import Settings
from rag.engine.engine import Engine
from rag.engine.prompt import Prompt
from rag.engine.request import Request
from rag.model.loader import load_model

DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / "samples"


def corpus_chunks(engine: Engine, corpus: Path, n_chunks: int, chunk_tokens: int) -> list[str]:
    """n_chunks consecutive windows of chunk_tokens model tokens of real text."""
    files = (
        sorted(corpus.rglob("*.md")) + sorted(corpus.rglob("*.txt"))
        if corpus.is_dir()
        else [corpus]
    )
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    ids = engine.tokenizer.encode_text(text)
    if len(ids) < n_chunks * chunk_tokens:
        raise ValueError(f"{corpus} has {len(ids)} tokens, need {n_chunks * chunk_tokens}")
    # Decode/re-encode can shift a token or two; trim to the exact size.
    return [
        engine.tokenizer.decode(ids[i * chunk_tokens : (i + 1) * chunk_tokens])
        for i in range(n_chunks)
    ]


def _ttft_ms(
    engine: Engine,
    prompt: Prompt,
    store: TieredStore | None,
    ratio: float,
    streamed: bool,
    request: Request | None = None,
) -> float:
    t0 = time.perf_counter()
    if store is None:
        pre = engine.prefill(prompt, "full")
    elif streamed:  # the engine's own path: loads stream in while it stitches
        engine.store = store
        pre = engine.prefill(prompt, "blend", ratio, engine.chunk_kvs(prompt, request or Request()))
    else:
        keys = [engine.chunk_key(ids) for ids in prompt.chunks]
        found = store.get_many(keys)
        kvs = [
            found.get(k) or engine.chunk_kv(ids) for k, ids in zip(keys, prompt.chunks, strict=True)
        ]
        pre = engine.prefill(prompt, "blend", ratio, kvs)
    int(pre.logits[-1].argmax())
    return 1000 * (time.perf_counter() - t0)


def _load_ms(engine: Engine, prompt: Prompt, store: TieredStore) -> float:
    t0 = time.perf_counter()
    store.get_many([engine.chunk_key(ids) for ids in prompt.chunks])
    return 1000 * (time.perf_counter() - t0)


def run_cache_bench(
    settings: Settings,
    corpus: Path | None = None,
    n_chunks: int = 4,
    chunk_tokens: int = 512,
    ratio: float = 0.15,
    repeats: int = 3,
    redis_url: str = "redis://127.0.0.1:6379/0",
) -> dict:
    lm = load_model(
        settings.model, settings.models_dir, settings.torch_dtype, settings.torch_device
    )
    engine = Engine(lm, settings.system_prompt, settings.max_context_tokens)
    texts = corpus_chunks(engine, corpus or DEFAULT_CORPUS, n_chunks, chunk_tokens)
    prompt = engine.prompts.build(texts, "Which facts in these documents matter most, and why?")
    kvs = {engine.chunk_key(ids): engine.chunk_kv(ids) for ids in prompt.chunks}
    out = bench_tiers(
        redis_url=redis_url, repeats=max(5, repeats * 3), entry=next(iter(kvs.values()))
    )
    tmp = Path(tempfile.mkdtemp(prefix="kvrag-bench-cache-"))
    fp = engine.fingerprint
    redis = RedisTier(redis_url, 600, f"kvrag:bench:{uuid.uuid4().hex}:") if redis_url else None
    stores = {
        "memory_hit": TieredStore(
            memory=MemoryTier(1 << 30, settings.torch_device), fingerprint=fp
        ),
        "disk_hit": TieredStore(disk=DiskTier(tmp / "kv", 1 << 30), fingerprint=fp),
        "miss": TieredStore(memory=MemoryTier(1 << 30), fingerprint=fp),  # never filled
    }
    if redis is not None:
        stores["redis_hit"] = TieredStore(redis=redis, fingerprint=fp)
    try:
        for name, store in stores.items():
            if name != "miss":
                store.put_many(kvs)
                store.flush()
        cases = [(name, streamed) for name in stores for streamed in (True, False)] + [
            ("full_prefill", True)
        ]
        times: dict[tuple[str, bool], list[float]] = {case: [] for case in cases}
        loads: dict[str, list[float]] = {name: [] for name in stores if name != "miss"}
        waits: dict[str, list[float]] = {name: [] for name in loads}
        for _ in range(repeats):
            for name, streamed in cases:
                if name == "miss":
                    stores[name].clear()  # the streamed path stores what it computed
                request = Request()
                times[name, streamed].append(
                    _ttft_ms(engine, prompt, stores.get(name), ratio, streamed, request)
                )
                if name in waits and streamed:
                    waits[name].append(request.store.wait_ms)
            for name in loads:
                loads[name].append(_load_ms(engine, prompt, stores[name]))
        med = {case: round(statistics.median(v), 1) for case, v in times.items()}
        ttft = {name: t for (name, streamed), t in med.items() if streamed}
        sequential = {name: t for (name, streamed), t in med.items() if not streamed}
        load_ms = {name: round(statistics.median(v), 1) for name, v in loads.items()}
        wait_ms = {name: round(statistics.median(v), 1) for name, v in waits.items()}
    finally:
        if redis is not None:
            redis.clear()
        for store in stores.values():
            store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    out.update(
        {
            "model": lm.name,
            "dtype": str(lm.model.dtype).removeprefix("torch."),
            "context_tokens": len(prompt),
            "ratio": ratio,
            "ttft_ms": ttft,
            "speedup_vs_full": {k: round(ttft["full_prefill"] / v, 2) for k, v in ttft.items()},
            "ttft_ms_sequential": sequential,
            "kv_load_ms": load_ms,
            "kv_wait_ms_streamed": wait_ms,
        }
    )
    return out


def add_bench_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus", type=Path, default=None, help="file or folder of .md/.txt (default: samples/)"
    )
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--redis-url", default="redis://127.0.0.1:6379/0", help="empty to skip the Redis tier"
    )
    p.add_argument("--json", type=Path, default=None, help="write the result here")


def cmd_bench_cache(args: argparse.Namespace, settings: Settings) -> int:
    result = run_cache_bench(
        settings,
        args.corpus,
        args.chunks,
        args.chunk_tokens,
        args.ratio,
        args.repeats,
        args.redis_url or None,
    )
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0
