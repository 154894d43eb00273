"""Generation: a prompt of retrieved chunks and a question, prefilled (in full, or blended from
chunk caches), then decoded.

The header's K/V is computed once per engine and copied into each request's buffer (prefix
caching). Chunk K/V come from the tiered store as they land, and a chunk missing there is
computed behind the header and stored for the next request. Everything after the header is
then prefilled in full or blended (rag.engine.blend), and decoding writes into the same
preallocated buffer with the engine's decode step (native on CPU where it builds).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cache.entry import ChunkKV
from cache.keys import chunk_key, fingerprint_tensors
from cache.store import TieredStore
from rag.engine import native_step
from rag.engine.blend import blend_prefill
from rag.engine.buffers import BufferPool
from rag.engine.decode import DecodeResult, decode, new_drafter
from rag.engine.decode_step import DecodeStep
from rag.engine.lookahead import AnswerMemory
from rag.engine.prompt import LAYOUT_VERSION, Prompt, PromptBuilder
from rag.engine.repair import blend_repair
from rag.engine.request import MODES, PromptTooLong, Request
from rag.model.kv_cache import KVCache
from rag.model.loader import LoadedModel

if TYPE_CHECKING:
    from rag.engine.scheduler import Scheduler

log = logging.getLogger(__name__)

# Chunk K/V are stored in 16 bits whatever the compute dtype.
KV_STORE_DTYPE = {
    torch.float32: torch.bfloat16,
    torch.bfloat16: torch.bfloat16,
    torch.float16: torch.float16,
}


@dataclass
class Prefill:
    cache: KVCache
    logits: torch.Tensor  # [n_footer, vocab] float32: next-token logits at each question position
    reused: int = 0
    recomputed: int = 0
    computed: int = 0


class Engine:
    def __init__(
        self,
        lm: LoadedModel,
        system_prompt: str,
        max_context: int = 8192,
        store: TieredStore | None = None,
        kv_budget_mb: float | None = None,
        max_batch: int = 1,
    ):
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.prompts = PromptBuilder(lm.tokenizer, system_prompt)
        self.max_context = min(max_context, self.model.args.max_positions)
        self.kv_dtype = KV_STORE_DTYPE[self.model.dtype]
        self.fingerprint = fingerprint_tensors(self.model.state_dict())  # part of every chunk key
        self.store = store
        budget = int(kv_budget_mb * 2**20) if kv_budget_mb else None
        self.buffers = BufferPool(self.model, self.max_context, budget, spare=max_batch)
        self.step = native_step.for_model(self.model) or DecodeStep(self.model)
        self.answers = AnswerMemory()  # recent answers' n-grams, for Lookahead's drafts
        self.header_kv = self._header_kv()
        self.scheduler: Scheduler | None = None  # set: generate() batches (start_scheduler)

    def start_scheduler(self, max_batch: int = 8) -> Scheduler:
        """From now on `generate` runs requests through a batching scheduler."""
        from rag.engine.scheduler import Scheduler

        self.scheduler = Scheduler(self, max_batch)
        return self.scheduler

    # -- buffers ------------------------------------------------------------------
    @torch.inference_mode()
    def _header_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        header = self.prompts.header
        cache = self.model.new_cache(len(header))
        self.model(torch.tensor([header], device=self.model.device), cache, 0, logits_for=None)
        k, v = cache.view(0, len(header))
        return k.clone(), v.clone()

    def new_cache(self, n_slots: int, wait: bool = False) -> KVCache:
        """A request buffer of n_slots with the header's K/V in place (`release` it when done);
        over the K/V budget, wait for one (`wait`) or raise OverBudget."""
        return self._with_header(self.buffers.take(n_slots, wait))

    def _with_header(self, cache: KVCache) -> KVCache:
        k, v = self.header_kv
        cache.load(0, k, v)
        cache.length = k.shape[2]
        return cache

    def release(self, cache: KVCache) -> None:
        self.buffers.give_back(cache)

    # -- chunk caches -------------------------------------------------------------
    def chunk_key(self, chunk_ids: list[int]) -> str:
        return chunk_key(
            self.fingerprint, self.prompts.header_fingerprint, chunk_ids, LAYOUT_VERSION
        )

    @torch.inference_mode()
    def chunk_kv(self, chunk_ids: list[int]) -> ChunkKV:
        """A chunk's K/V computed right behind the header (whose own K/V is dropped)."""
        h = len(self.prompts.header)
        # Not from the request pool: a short-lived buffer outside the requests' K/V budget.
        cache = self._with_header(self.model.new_cache(h + len(chunk_ids)))
        self.model(
            torch.tensor([chunk_ids], device=self.model.device), cache, h, logits_for=slice(0, 0)
        )
        k, v = cache.view(h, h + len(chunk_ids))
        return ChunkKV(k.to(self.kv_dtype).clone(), v.to(self.kv_dtype).clone(), base_position=h)

    def chunk_kvs(self, prompt: Prompt, request: Request) -> Iterator[ChunkKV]:
        """The prompt's chunk K/V in order, each as soon as the store delivers it; a chunk the
        store misses (or holds for other tokens) is computed when its turn comes, and written
        to the store once the stream is exhausted."""
        if self.store is None:
            request.chunk_misses = len(prompt.chunks)
            request.chunk_miss_tokens = sum(len(ids) for ids in prompt.chunks)
            yield from (self.chunk_kv(ids) for ids in prompt.chunks)
            return
        request.store = request.store or self.store.begin_request()
        keys = [self.chunk_key(ids) for ids in prompt.chunks]
        computed: dict[str, ChunkKV] = {}
        for key, ids, kv in zip(
            keys, prompt.chunks, self.store.stream(keys, request.store), strict=True
        ):
            if kv is not None and not self._matches(kv, ids, key):
                kv = None
            if kv is None:
                kv = computed[key] = self.chunk_kv(ids)
                request.chunk_miss_tokens += len(ids)
            yield kv
        request.chunk_hits, request.chunk_misses = len(keys) - len(computed), len(computed)
        self.store.put_many(computed, request.store)

    def _matches(self, kv: ChunkKV, ids: list[int], key: str) -> bool:
        """A stored entry fits this chunk: its token count and this model's shape."""
        a = self.model.args
        if kv.shape == (a.n_layers, a.n_kv_heads, len(ids), a.head_dim):
            return True
        log.warning("chunk K/V %s has shape %s, not this chunk's; recomputed", key, kv.shape)
        return False

    def ensure_stored(self, text: str) -> bool:
        """Compute and store a chunk's K/V unless the store has it; True if it was computed."""
        assert self.store is not None, "the engine has no store"
        ids = self.prompts.chunk_ids(text)
        key = self.chunk_key(ids)
        if self.store.get_many([key]):
            return False
        self.store.put(key, self.chunk_kv(ids))
        return True

    def forget(self, texts: Iterable[str]) -> None:
        """Drop the stored K/V of these chunk texts."""
        if self.store is not None:
            for text in texts:
                self.store.delete(self.chunk_key(self.prompts.chunk_ids(text)))

    # -- prefill ------------------------------------------------------------------
    def check_fits(self, prompt: Prompt) -> None:
        if len(prompt) > self.max_context:
            raise PromptTooLong(
                f"prompt of {len(prompt)} tokens exceeds the context limit {self.max_context}"
            )

    @torch.inference_mode()
    def prefill(
        self,
        prompt: Prompt,
        mode: str = "full",
        ratio: float = 0.15,
        chunk_kvs: Iterable[ChunkKV | None] | None = None,
        extra_slots: int = 0,
        gradual: int = 1,
        cache: KVCache | None = None,
        *,
        logit_rows: int | None = None,
    ) -> Prefill:
        """K/V of the whole prompt in a new request buffer (or `cache`, from `new_cache`), and
        the question's next-token logits (of its last `logit_rows` positions; None: all).
        `chunk_kvs` (blend and reuse) default to computing each chunk's."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.check_fits(prompt)
        if cache is None:
            cache = self.new_cache(len(prompt) + extra_slots)
            try:
                args = (prompt, mode, ratio, chunk_kvs, extra_slots, gradual, cache)
                return self.prefill(*args, logit_rows=logit_rows)
            except BaseException:
                self.release(cache)
                raise
        h = len(prompt.header)
        if mode == "full" or not prompt.chunks:
            ids = torch.tensor([prompt.ids()[h:]], device=self.model.device)
            rows = len(prompt.footer) if logit_rows is None else min(logit_rows, len(prompt.footer))
            logits = self.model(ids, cache, h, logits_for=slice(-rows, None))[0]
            n = len(prompt) - h
            return Prefill(cache, logits, reused=0, recomputed=n, computed=n)
        kvs = chunk_kvs if chunk_kvs is not None else [self.chunk_kv(c) for c in prompt.chunks]
        r = blend_prefill(
            self.model,
            cache,
            prompt,
            kvs,
            0.0 if mode == "reuse" else ratio,
            gradual=gradual,
            logit_rows=logit_rows,
        )
        return Prefill(
            cache, r.logits, reused=r.reused, recomputed=r.recomputed, computed=r.computed
        )

    # -- generation ---------------------------------------------------------------
    def prompt(self, chunk_texts: list[str], question: str, preface: str = "") -> Prompt:
        """The prompt of `question` over these chunks (after `preface`: earlier turns and
        instructions); PromptTooLong if it cannot fit."""
        prompt = self.prompts.build(chunk_texts, question, preface)
        self.check_fits(prompt)
        return prompt

    def room(self, request: Request, prompt: Prompt) -> int:
        """Slots for the answer: what it asks for, within the context limit."""
        return max(0, min(request.params.max_new_tokens, self.max_context - len(prompt)))

    def record_prefill(self, request: Request, prompt: Prompt, pre: Prefill) -> None:
        request.timings_ms["kv_load"] = request.store.wait_ms if request.store else 0.0
        request.prompt_tokens = len(prompt)
        request.reused_tokens, request.recomputed_tokens = pre.reused, pre.recomputed
        request.computed_tokens = pre.computed
        # The header is always reused; a chunk the store missed was computed for this request.
        reused = pre.reused - pre.recomputed - request.chunk_miss_tokens
        request.cached_prompt_tokens = len(prompt.header) + max(0, reused)

    def record_decode(
        self, request: Request, r: DecodeResult, room: int, t_decode: float, drafted: bool
    ) -> Request:
        if drafted:  # only where Lookahead runs: elsewhere nothing reads it
            self.answers.add(r.ids)
        first = r.first_token_at or t_decode  # (none with no room for an answer)
        request.timings_ms["ttft"] = 1000 * (first - request.started)
        request.mark("decode", t_decode)
        request.output_ids, request.text = r.ids, r.text.strip()
        request.finish_reason = (
            "context" if room < request.params.max_new_tokens and r.finish == "length" else r.finish
        )
        request.decode_steps, request.accepted_drafts = r.steps, r.accepted
        request.done()
        return request

    def generate(self, request: Request, prompt: Prompt) -> Request:
        """Prefill, then decode; fills `request` with the answer and what it took. With a
        scheduler, the request decodes in a batch with the others running."""
        if self.scheduler is not None:
            return self.scheduler.run(request, prompt)
        p = request.params
        room = self.room(request, prompt)
        t0 = time.perf_counter()
        blended = request.mode != "full" and prompt.chunks
        kvs = self.chunk_kvs(prompt, request) if blended else None
        # Only the last position's logits: the first token is all that is served from them.
        pre = self.prefill(
            prompt,
            request.mode,
            request.ratio,
            kvs,
            extra_slots=room,
            gradual=request.gradual,
            logit_rows=1,
        )
        # The drafter's trie is built before the first token: prefill time.
        drafter = new_drafter(
            prompt.ids()[len(prompt.header) :],
            p.temperature,
            p.lookahead,
            self.step,
            self.model.device,
            self.answers,
        )
        t_decode = request.mark("prefill", t0)
        self.record_prefill(request, prompt, pre)
        repair = blend_repair(self.model, pre.cache, prompt) if blended and request.repair else None
        try:
            r = decode(
                self.model,
                self.step,
                self.tokenizer,
                pre.cache,
                pre.logits[-1],
                len(prompt),
                room,
                temperature=p.temperature,
                top_p=p.top_p,
                stop=p.stop,
                on_text=request.on_text,
                seed=p.seed,
                drafter=drafter,
                ignore_eos=p.ignore_eos,
                repair=repair,
                repair_tokens=request.repair,
            )
        finally:
            self.release(pre.cache)
        request.repaired_tokens = r.repaired
        return self.record_decode(request, r, room, t_decode, drafter is not None)
