"""Generation: prefill (full, or blended from chunk caches), then decode.

The header's K/V is computed once per engine and copied into each request's
buffer (prefix caching); everything after it is either prefilled in full or
blended (rag.engine.blend); decoding then writes one token per step into the same
preallocated buffer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from cache.entry import ChunkKV
from cache.keys import chunk_key
from rag.engine.blend import blend_prefill
from rag.engine.decode import decode as decode_loop
from rag.engine.decode import new_drafter
from rag.engine.lookahead import AnswerMemory
from rag.engine.prompt import LAYOUT_VERSION, Prompt, PromptBuilder
from rag.model.kv_cache import KVCache
from rag.model.loader import LoadedModel

MODES = ("full", "reuse", "blend")
SPARE_BUFFERS = 2  # released request buffers kept for reuse (one generation thread)
SLOT_ROUND = 256  # request buffers are allocated in multiples of this many slots
KV_STORE_DTYPE = {torch.float32: torch.bfloat16, torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}


@dataclass
class Prefill:
    cache: KVCache
    logits: torch.Tensor  # [n_footer, vocab] float32: next-token logits at each question position
    reused: int = 0
    recomputed: int = 0
    computed: int = 0


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop", "length" or "context"
    prompt_tokens: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)


class Engine:
    def __init__(self, lm: LoadedModel, system_prompt: str, max_context: int = 8192):
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.prompts = PromptBuilder(lm.tokenizer, system_prompt)
        self.max_context = min(max_context, self.model.args.max_positions)
        self.kv_dtype = KV_STORE_DTYPE[self.model.dtype]
        self._header_kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self._spare: list[KVCache] = []  # released request buffers (new_cache)
        self._spare_lock = threading.Lock()
        self.answers = AnswerMemory()  # recent answers' n-grams, for Lookahead's drafts

    # -- prefix (header) cache -------------------------------------------------
    def header_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._header_kv is None:
            header = self.prompts.header
            cache = self.model.new_cache(len(header))
            self.model(torch.tensor([header], device=self.model.device), cache, 0, logits_for=None)
            k, v = cache.view(0, len(header))
            self._header_kv = (k.clone(), v.clone())
        return self._header_kv

    def new_cache(self, n_slots: int) -> KVCache:
        """A request buffer of n_slots with the header's K/V in place (`release` it when done).

        A view of a buffer that an earlier request released, when one is large enough: fresh
        memory costs the OS's page faults (2K slots, 2 x 24.5 MB: 16-68 ms here, ~5% of a
        blended TTFT), reuse nothing. A reused buffer holds old, finite K/V in the slots not
        written yet; every read of those is masked, as it is of a fresh buffer's zeros.
        """
        n_slots = min(n_slots, self.max_context)
        with self._spare_lock:
            fits = [b for b in self._spare if b.max_len >= n_slots]
            if fits:
                buf = min(fits, key=lambda b: b.max_len)
                self._spare.remove(buf)
        if not fits:  # rounded up, so that later requests of about this size fit in it
            buf = self.model.new_cache(min(self.max_context, -(-n_slots // SLOT_ROUND) * SLOT_ROUND))
        cache = KVCache(buf.k[:, :, :, :n_slots], buf.v[:, :, :, :n_slots])
        k, v = self.header_kv()
        cache.load(0, k, v)
        cache.length = k.shape[2]
        return cache

    def release(self, cache: KVCache) -> None:
        """Hand a buffer from `new_cache` back for reuse; `cache` must not be used afterwards."""
        k, v = cache.k._base, cache.v._base  # the whole buffer this request had a view of
        if k is None or v is None:
            return
        with self._spare_lock:
            if all(b.k.data_ptr() != k.data_ptr() for b in self._spare):
                self._spare.append(KVCache(k, v))
                self._spare = sorted(self._spare, key=lambda b: b.max_len)[-SPARE_BUFFERS:]

    # -- chunk caches ----------------------------------------------------------
    def chunk_key(self, chunk_ids: list[int]) -> str:
        return chunk_key(self.lm.fingerprint, self.prompts.header_fingerprint, chunk_ids, LAYOUT_VERSION)

    @torch.inference_mode()
    def chunk_kv(self, chunk_ids: list[int]) -> ChunkKV:
        """A chunk's K/V computed right behind the header (whose own K/V is dropped)."""
        h = len(self.prompts.header)
        cache = self.new_cache(h + len(chunk_ids))
        self.model(torch.tensor([chunk_ids], device=self.model.device), cache, h, logits_for=None)
        k, v = cache.view(h, h + len(chunk_ids))
        kv = ChunkKV(k.to(self.kv_dtype).clone(), v.to(self.kv_dtype).clone(), base_position=h)
        self.release(cache)
        return kv

    # -- prefill ---------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompt: Prompt, mode: str = "full", ratio: float = 0.15,
                chunk_kvs: Iterable[ChunkKV | None] | None = None, extra_slots: int = 0,
                gradual: int = 1, selection: str = "attention") -> Prefill:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if len(prompt) > self.max_context:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds the context limit {self.max_context}")
        cache = self.new_cache(len(prompt) + extra_slots)
        h = len(prompt.header)
        if mode == "full" or not prompt.chunks:
            ids = torch.tensor([prompt.ids()[h:]], device=self.model.device)
            logits = self.model(ids, cache, h, logits_for=slice(-len(prompt.footer), None))[0]
            n = len(prompt) - h
            return Prefill(cache, logits, reused=0, recomputed=n, computed=n)
        kvs = chunk_kvs if chunk_kvs is not None else [self.chunk_kv(c) for c in prompt.chunks]
        r = blend_prefill(self.model, cache, prompt, kvs, 0.0 if mode == "reuse" else ratio,
                          gradual=gradual, selection=selection)
        return Prefill(cache, r.logits, reused=r.reused, recomputed=r.recomputed, computed=r.computed)

    def generate(self, prompt: Prompt, *, mode: str = "full", ratio: float = 0.15,
                 chunk_kvs: Iterable[ChunkKV | None] | None = None, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None,
                 on_text: Callable[[str], bool | None] | None = None, seed: int | None = None,
                 lookahead: bool | None = None, gradual: int = 1, selection: str = "attention") -> Generation:
        """Prefill then decode. `lookahead` None = Lookahead drafting where lossless (rag.engine.decode.new_drafter)."""
        t0 = time.perf_counter()
        room = max(0, min(max_new_tokens, self.max_context - len(prompt)))
        pre = self.prefill(prompt, mode, ratio, chunk_kvs, extra_slots=room, gradual=gradual, selection=selection)
        # The drafter's trie is built before the first token (~10 ms per 1K tokens of context): prefill time.
        drafter = new_drafter(prompt.ids()[len(prompt.header):], temperature, lookahead, self.model, self.answers)
        t_prefill = time.perf_counter()
        r = decode_loop(self.model, self.tokenizer, pre.cache, pre.logits[-1], len(prompt),
                        max(1, room) if room else 0, temperature=temperature, top_p=top_p, stop=stop,
                        on_text=on_text, seed=seed, drafter=drafter)
        self.release(pre.cache)
        if drafter is not None:  # only where Lookahead runs: on CUDA (off by default) nothing reads it
            self.answers.add(r.ids)
        finish = r.finish
        if room < max_new_tokens and finish == "length":
            finish = "context"
        t1 = time.perf_counter()
        return Generation(
            token_ids=r.ids, text=r.text.strip(), finish_reason=finish, prompt_tokens=len(prompt),
            timings_ms={"prefill": 1000 * (t_prefill - t0), "ttft": 1000 * (t_prefill - t0 + r.ttft_s),
                        "decode": 1000 * (t1 - t_prefill), "total": 1000 * (t1 - t0)},
            stats={"reused_tokens": pre.reused, "recomputed_tokens": pre.recomputed,
                   "computed_tokens": pre.computed, "completion_tokens": len(r.ids),
                   "decode_steps": r.steps, "draft_accepted_tokens": r.accepted},
        )
