"""One generation request: what is asked, and what happened to it on the way to its answer.

The service creates it when the request arrives, every stage records its own part (retrieval,
chunk K/V loads, prefill, decode) as it happens, and the caller reads the result from it.
Nothing is reconstructed afterwards from global counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cache.request import StoreRequest

MODES = ("full", "reuse", "blend")


class PromptTooLong(ValueError):
    """The prompt does not fit the context window (the client's error, not the server's)."""


@dataclass
class GenerationParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # run to max_new_tokens past the end token (benchmarks)
    lookahead: bool | None = None  # None: on where it is lossless (rag.engine.decode.new_drafter)


@dataclass
class Request:
    mode: str = "blend"
    ratio: float = 0.15  # blend: the share of reused tokens recomputed
    gradual: int = 1  # blend: check layers the selection shrinks over
    repair: int = 0  # blend/reuse: stale slots recomputed before each decode step (0 = none)
    params: GenerationParams = field(default_factory=GenerationParams)
    on_text: Callable[[str], bool | None] | None = None  # text deltas; False stops generation

    started: float = field(default_factory=time.perf_counter)
    timings_ms: dict[str, float] = field(default_factory=dict)  # retrieve, kv_load, prefill, ...
    store: StoreRequest | None = None  # this request's chunk-KV store traffic, per tier
    chunk_hits: int = 0  # chunks whose K/V came from the store
    chunk_misses: int = 0  # chunks computed for this request (and stored)
    chunk_miss_tokens: int = 0  # their tokens
    reused_tokens: int = 0  # context tokens whose K/V were reused
    recomputed_tokens: int = 0  # of those, recomputed by the blend
    repaired_tokens: int = 0  # stale slots recomputed while decoding (rag.engine.repair)
    computed_tokens: int = 0  # tokens computed in the last layer of the prefill
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose K/V were reused, not computed
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""  # "stop", "length", "context" or "cancelled"
    decode_steps: int = 0
    accepted_drafts: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    def mark(self, name: str, since: float) -> float:
        """Record the milliseconds from `since` to now as timing `name`; returns now."""
        now = time.perf_counter()
        self.timings_ms[name] = 1000 * (now - since)
        return now

    def done(self) -> None:
        self.timings_ms["total"] = 1000 * (time.perf_counter() - self.started)

    def usage(self) -> dict:
        """OpenAI's usage object."""
        n = len(self.output_ids)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": self.prompt_tokens + n,
            "prompt_tokens_details": {"cached_tokens": self.cached_prompt_tokens},
        }

    def cache_report(self) -> dict:
        """What the request reused and recomputed, and what each store tier served it."""
        return {
            "kv_hits": self.chunk_hits,
            "kv_misses": self.chunk_misses,
            "reused_tokens": self.reused_tokens,
            "recomputed_tokens": self.recomputed_tokens,
            "computed_tokens": self.computed_tokens,
            "repaired_tokens": self.repaired_tokens,
            "decode_steps": self.decode_steps,
            "draft_accepted_tokens": self.accepted_drafts,
            "tiers": self.store.served() if self.store is not None else {},
        }
