"""The RAG service: retrieve chunks, load their K/V, blend (or prefill), decode.

One object per process holds the model, the embedder, the current index
generation and the chunk-KV store; the CLI and the API both call `answer`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cache.factory import build_store
from cache.store import TieredStore
from rag.config import Settings
from rag.engine.decode_step import stepper_for
from rag.engine.engine import Engine
from rag.engine.kv_stream import stream_chunk_kvs
from rag.index.docstore import Chunk, Docstore
from rag.index.embedder import Embedder
from rag.index.generations import IndexStore
from rag.index.retriever import Retriever
from rag.index.vector_index import VectorIndex
from rag.model.loader import load_model

log = logging.getLogger(__name__)

STATS_PERSIST_S = 5.0  # how often answers add the store's traffic to the data dir's totals


@dataclass
class Hit:
    chunk: Chunk
    score: float

    def citation(self) -> dict:
        c = self.chunk
        return {"doc_id": c.doc_id, "start": c.start, "end": c.end, "score": round(self.score, 4),
                "chunk_id": c.chunk_id, "text": c.text}


@dataclass
class Answer:
    answer: str
    hits: list[Hit]
    mode: str
    finish_reason: str
    timings_ms: dict[str, float]
    usage: dict[str, int]
    cache: dict[str, int] = field(default_factory=dict)

    def as_dict(self, with_text: bool = False) -> dict:
        cites = [h.citation() for h in self.hits]
        if not with_text:
            cites = [{k: v for k, v in c.items() if k != "text"} for c in cites]
        return {"answer": self.answer, "citations": cites, "mode": self.mode,
                "finish_reason": self.finish_reason,
                "timings_ms": {k: round(v, 1) for k, v in self.timings_ms.items()},
                "usage": self.usage, "cache": self.cache}


class RAG:
    def __init__(self, settings: Settings, *, with_model: bool = True):
        self.settings = settings
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.embedder = Embedder(settings.embedder, "cpu")
        self.index_store = IndexStore(settings.index_dir, self.embedder.dim)
        self._generation: str | None = None
        self._index_lock = threading.Lock()
        self.docstore: Docstore
        self.index: VectorIndex
        self.retriever: Retriever
        self.reload_index()
        self.engine: Engine | None = None
        self.store: TieredStore | None = None
        if with_model:
            lm = load_model(settings.model, settings.models_dir, settings.torch_dtype, settings.torch_device)
            self.engine = Engine(lm, settings.system_prompt, settings.max_context_tokens)
            self.engine.header_kv()  # prefix cache at start-up, not on the first request
            stepper_for(lm.model)  # likewise the decode step (the native one compiles once per machine)
            self.store = build_store(
                settings.cache_memory_mb, settings.kv_dir, settings.cache_disk_mb, settings.redis_url or None,
                settings.cache_redis_ttl_s, device=settings.torch_device,
                max_new_per_request=settings.cache_max_new_per_request, fingerprint=lm.fingerprint,
                stats_path=settings.cache_stats_path)

    # -- index ---------------------------------------------------------------
    def reload_index(self) -> bool:
        """Pick up a newer index generation if an ingestion committed one."""
        gen = self.index_store.current_dir()
        name = gen.name if gen else None
        if name == self._generation and hasattr(self, "docstore"):
            return False
        docstore, index, lexical = self.index_store.open()
        retriever = Retriever(index, lexical if self.settings.retrieval == "hybrid" else None)
        with self._index_lock:
            self.docstore, self.index, self.retriever = docstore, index, retriever
            self._generation = name
        return True

    def retrieve(self, question: str, k: int) -> list[Hit]:
        self.reload_index()
        vec = self.embedder.embed([question])[0]
        with self._index_lock:
            found = self.retriever.search(vec, question, k)
            chunks = self.docstore.get_chunks([cid for cid, _ in found])
        return [Hit(chunks[cid], score) for cid, score in found if cid in chunks]

    # -- chunk K/V -----------------------------------------------------------
    def warm(self, progress: Callable[[int], None] | None = None) -> int:
        """Precompute every indexed chunk's K/V into the store; returns chunks computed."""
        assert self.engine is not None and self.store is not None
        self.reload_index()
        computed = 0
        for chunk in self.docstore.all_chunks():
            ids = self.engine.prompts.chunk_ids(chunk.text)
            key = self.engine.chunk_key(ids)
            if not self.store.get_many([key]):
                self.store.put(key, self.engine.chunk_kv(ids))
                computed += 1
            if progress:
                progress(1)
        self.store.flush()
        self.store.persist_stats()
        return computed

    # -- answer --------------------------------------------------------------
    def answer(
        self,
        question: str,
        *,
        k: int | None = None,
        mode: str | None = None,
        ratio: float | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        on_text: Callable[[str], bool | None] | None = None,
        seed: int | None = None,
    ) -> Answer:
        assert self.engine is not None, "RAG was built without a model"
        s = self.settings
        k = s.top_k if k is None else k
        mode = mode or s.mode
        ratio = s.blend_ratio if ratio is None else ratio
        t0 = time.perf_counter()
        hits = self.retrieve(question, k)
        t_retrieve = time.perf_counter()
        prompt = self.engine.prompts.build([h.chunk.text for h in hits], question)
        cache_stats: dict = {}
        # Loads start now and overlap the request buffer setup and the stitching (rag/kv_stream.py).
        kvs = stream_chunk_kvs(self.store, self.engine, prompt, cache_stats) if mode != "full" and hits else None
        t_kv = time.perf_counter()
        gen = self.engine.generate(
            prompt, mode=mode, ratio=ratio, chunk_kvs=kvs, gradual=s.blend_gradual, selection=s.blend_selection,
            max_new_tokens=s.max_new_tokens if max_new_tokens is None else max_new_tokens,
            temperature=temperature, top_p=top_p, stop=stop, on_text=on_text, seed=seed)
        t1 = time.perf_counter()
        ms = lambda a, b: 1000 * (b - a)  # noqa: E731
        timings = {"retrieve": ms(t0, t_retrieve), "kv_load": cache_stats.pop("kv_wait_ms", 0.0),
                   "prefill": gen.timings_ms["prefill"],
                   "ttft": ms(t0, t_kv) + gen.timings_ms["ttft"], "decode": gen.timings_ms["decode"],
                   "total": ms(t0, t1)}
        usage = {"prompt_tokens": gen.prompt_tokens, "completion_tokens": len(gen.token_ids),
                 "total_tokens": gen.prompt_tokens + len(gen.token_ids)}
        cache_stats.update({k2: v for k2, v in gen.stats.items() if k2 != "completion_tokens"})
        if kvs is not None:
            self.store.persist_stats(min_interval_s=STATS_PERSIST_S)
        return Answer(gen.text, hits, mode, gen.finish_reason, timings, usage, cache_stats)
