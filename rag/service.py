"""The RAG service: retrieve a question's chunks, then generate its answer over their K/V.

One object per process holds the embedder, the current index generation and the engine (the
model and its chunk-KV store); the CLI and the API both answer through `answer`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from cache.factory import build_store
from cache.store import TieredStore
from rag.config import Settings
from rag.conversation import Conversation, preface
from rag.engine.engine import Engine
from rag.engine.request import GenerationParams, Request
from rag.index.docstore import Chunk, Docstore
from rag.index.embedder import Embedder
from rag.index.generations import IndexGenerations
from rag.index.retriever import Retriever
from rag.index.vector_index import VectorIndex
from rag.model.loader import load_model

log = logging.getLogger(__name__)

STATS_PERSIST_S = 5.0  # how often answers add the store's traffic to the data dir's totals


@dataclass
class Hit:
    chunk: Chunk
    score: float

    def citation(self, with_text: bool = False) -> dict:
        c = self.chunk
        cite = {
            "doc_id": c.doc_id,
            "start": c.start,
            "end": c.end,
            "score": round(self.score, 4),
            "chunk_id": c.chunk_id,
        }
        return {**cite, "text": c.text} if with_text else cite


@dataclass
class Answer:
    hits: list[Hit]
    request: Request
    query: str = ""  # what retrieval searched for
    turns_used: int = 0  # earlier conversation messages in the prompt
    turns_dropped: int = 0  # older ones left out to fit the history budget

    @property
    def text(self) -> str:
        return self.request.text

    def as_dict(self) -> dict:
        r = self.request
        return {
            "answer": r.text,
            "citations": [h.citation() for h in self.hits],
            "mode": r.mode,
            "finish_reason": r.finish_reason,
            "timings_ms": {k: round(v, 1) for k, v in r.timings_ms.items()},
            "usage": r.usage(),
            "cache": r.cache_report(),
            "conversation": self.conversation_info(),
        }

    def conversation_info(self) -> dict:
        return {
            "turns_used": self.turns_used,
            "turns_dropped": self.turns_dropped,
            "retrieval_query": self.query,
        }


class RAGService:
    def __init__(self, settings: Settings):
        self.settings = settings
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.embedder = Embedder(settings.embedder, "cpu")
        self.generations = IndexGenerations(settings.index_dir, self.embedder.dim)
        self._generation: str | None = None
        self._index_lock = threading.Lock()
        self.docstore: Docstore
        self.index: VectorIndex
        self.retriever: Retriever
        self.reload_index()
        lm = load_model(
            settings.model, settings.models_dir, settings.torch_dtype, settings.torch_device
        )
        self.engine = Engine(
            lm,
            settings.system_prompt,
            settings.max_context_tokens,
            kv_budget_mb=settings.kv_budget_mb or None,
            max_batch=settings.max_batch,
        )
        self._embed_lock = threading.Lock()  # the embedder is not thread-safe
        self.engine.store = build_store(
            settings.cache_memory_mb,
            settings.kv_dir,
            settings.cache_disk_mb,
            settings.redis_url or None,
            settings.cache_redis_ttl_s,
            device=settings.torch_device,
            max_new_per_request=settings.cache_max_new_per_request,
            fingerprint=self.engine.fingerprint,
            stats_path=settings.cache_stats_path,
        )

    @property
    def model_name(self) -> str:
        return self.engine.lm.name

    @property
    def store(self) -> TieredStore:
        assert self.engine.store is not None
        return self.engine.store

    # -- index ------------------------------------------------------------------
    def reload_index(self) -> bool:
        """Pick up a newer index generation if an ingestion committed one."""
        gen = self.generations.current_dir()
        name = gen.name if gen else None
        if name == self._generation and hasattr(self, "docstore"):
            return False
        docstore, index, lexical = self.generations.open()
        retriever = Retriever(index, lexical if self.settings.retrieval == "hybrid" else None)
        with self._index_lock:
            self.docstore, self.index, self.retriever = docstore, index, retriever
            self._generation = name
        return True

    def documents(self) -> list[dict]:
        """The current generation's documents (id, source, size, chunks, hash, time added)."""
        self.reload_index()
        with self._index_lock:
            return self.docstore.list_documents()

    def document_text(self, doc_id: str) -> str | None:
        """A current document's text (citation offsets point into it), None if absent."""
        self.reload_index()
        with self._index_lock:
            doc = self.docstore.get_document(doc_id)
        return doc.text if doc is not None else None

    def retrieve(self, question: str, k: int) -> list[Hit]:
        self.reload_index()
        with self._embed_lock:
            vec = self.embedder.embed([question])[0]
        with self._index_lock:
            found = self.retriever.search(vec, question, k)
            chunks = self.docstore.get_chunks([cid for cid, _ in found])
        return [Hit(chunks[cid], score) for cid, score in found if cid in chunks]

    # -- chunk K/V --------------------------------------------------------------
    def warm(self, progress: Callable[[int], None] | None = None) -> int:
        """Precompute every indexed chunk's K/V into the store; returns chunks computed."""
        self.reload_index()
        computed = 0
        for chunk in self.docstore.all_chunks():
            computed += self.engine.ensure_stored(chunk.text)
            if progress:
                progress(1)
        self.store.flush()
        self.persist_stats()
        return computed

    def forget_chunks(self, chunks: Iterable[Chunk]) -> None:
        """Drop the stored K/V of chunks that left the index."""
        self.engine.forget(c.text for c in chunks)

    def persist_stats(self, min_interval_s: float = 0.0) -> None:
        self.store.persist_stats(min_interval_s=min_interval_s)

    def cache_stats(self) -> dict:
        """The chunk-KV store's traffic per tier since this process started, and its usage."""
        return self.store.stats()

    def clear_cache(self) -> list[str]:
        """Empty every tier of the chunk-KV store; returns their names."""
        self.store.clear()
        return self.store.tier_names

    def redis_state(self) -> str:
        """ "disabled" (no Redis tier), "up" or "down"."""
        redis = self.store.redis
        if redis is None:
            return "disabled"
        return "up" if redis.is_up() else "down"

    def disk_state(self) -> str:
        """ "disabled" (no disk tier), "ok", or "failing" (its last write failed)."""
        disk = self.store.disk
        if disk is None:
            return "disabled"
        return "failing" if getattr(disk, "failing", False) else "ok"

    # -- answer -----------------------------------------------------------------
    def start_batching(self, max_batch: int) -> None:
        """Answers from now on decode together, up to max_batch at once (rag.engine.scheduler);
        `answer` may then be called from several threads."""
        if self.engine.scheduler is None:
            self.engine.start_scheduler(max_batch)

    def stop_batching(self) -> None:
        if self.engine.scheduler is not None:
            self.engine.scheduler.close()
            self.engine.scheduler = None

    def answer(
        self,
        question: str,
        *,
        k: int | None = None,
        mode: str | None = None,
        ratio: float | None = None,
        repair: int | None = None,
        params: GenerationParams | None = None,
        on_text: Callable[[str], bool | None] | None = None,
        conversation: Conversation | None = None,
        query_method: str | None = None,
    ) -> Answer:
        """Answer `question`, or the last question of `conversation` with its earlier turns
        and instructions after the chunks."""
        s = self.settings
        conv = conversation or Conversation(question)
        request = Request(
            mode=mode or s.mode,
            ratio=s.blend_ratio if ratio is None else ratio,
            gradual=s.blend_gradual,
            repair=s.blend_repair if repair is None else repair,
            params=params or GenerationParams(max_new_tokens=s.max_new_tokens),
            on_text=on_text,
        )
        query = self.retrieval_query(conv, query_method or s.conversation_query)
        hits = self.retrieve(query, s.top_k if k is None else k)
        request.mark("retrieve", request.started)
        history = conv.fit_history(self.count_tokens, s.history_tokens)
        prompt = self.engine.prompt(
            [h.chunk.text for h in hits], conv.question, preface(history, conv.instructions)
        )
        self.engine.generate(request, prompt)
        if request.mode != "full":
            self.persist_stats(min_interval_s=STATS_PERSIST_S)
        return Answer(hits, request, query, len(history), len(conv.turns) - len(history))

    def count_tokens(self, text: str) -> int:
        return len(self.engine.tokenizer.encode_text(text))

    def retrieval_query(self, conv: Conversation, method: str) -> str:
        """What a conversation's question retrieves with: the question alone ("last"), the
        latest user messages joined ("concat"), or a standalone question the model wrote."""
        if not conv.turns or method == "last":
            return conv.question
        if method == "concat":
            return conv.concat_query()
        if method == "rewrite":
            return self.rewrite_query(conv)
        raise ValueError(f"unknown conversation query method {method!r}")

    def rewrite_query(self, conv: Conversation, max_new_tokens: int = 40) -> str:
        request = Request(mode="full", params=GenerationParams(max_new_tokens=max_new_tokens))
        self.engine.generate(request, self.engine.prompt([], conv.rewrite_prompt()))
        lines = [line.strip() for line in request.text.splitlines() if line.strip()]
        return lines[0] if lines else conv.question
