"""Reuse: chunk K/V computed elsewhere, placed at their positions in this prompt.

Each chunk's keys were rotated (RoPE) at the positions the chunk was computed at; moving them
to new positions is one more rotation, which is exact. Values do not depend on position.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from cache.entry import ChunkKV
from rag.engine.prompt import Prompt
from rag.model.kv_cache import KVCache
from rag.model.layers import rope_cos_sin

log = logging.getLogger(__name__)

ROTATE_LAYERS = (
    2  # layers re-rotated at a time: a 512-token chunk's float32 temporaries stay in cache
)


def rerotate(
    k: torch.Tensor, delta: int, inv_freq: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Keys rotated at positions p -> rotated at p + delta (exact: rotations compose).

    k [n_layers, ...]. Computed in float32 (16-bit keys are promoted) and rounded once, into
    `out` (a slice of the request buffer; float32 if not given). One delta for all keys, so the
    rotation is a 2x2 on the two halves with scalar cos/sin per frequency (no full-size
    temporaries), a couple of layers at a time so the float32 temporaries stay in cache. Uses
    the raw inverse frequencies: any attention scaling of cos/sin (YaRN) is already inside k
    and must not be applied twice.
    """
    out = torch.empty(k.shape, dtype=torch.float32, device=k.device) if out is None else out
    if delta == 0:
        return out.copy_(k)
    half = k.shape[-1] // 2
    cos, sin = rope_cos_sin(inv_freq.to(k.device), torch.tensor([delta], device=k.device))
    c, s = cos[0, :half], sin[0, :half]  # rope_cos_sin repeats its halves
    for i in range(0, k.shape[0], ROTATE_LAYERS):
        part, o = k[i : i + ROTATE_LAYERS].float(), out[i : i + ROTATE_LAYERS]
        k1, k2 = part[..., :half], part[..., half:]
        o[..., :half] = k1 * c - k2 * s
        o[..., half:] = k2 * c + k1 * s
    return out


def stitch(
    cache: KVCache, prompt: Prompt, chunk_kvs: Iterable[ChunkKV | None], inv_freq: torch.Tensor
) -> list[ChunkKV | None]:
    """Place each cached chunk's K/V at its position in this prompt (an uncached chunk's slots
    keep the buffer's zeros until the blend computes them).

    `chunk_kvs` may be a stream (a generator over a store's in-flight loads): each chunk is
    placed as soon as it arrives, while the later ones are still loading. Returns them all.
    """
    cache.ensure(prompt.context_end)
    placed: list[ChunkKV | None] = []
    for start, kv, chunk in zip(prompt.chunk_starts, chunk_kvs, prompt.chunks, strict=True):
        if kv is not None:
            try:
                kv_here, end = kv.to(cache.k.device), start + len(chunk)
                delta = start - kv.base_position
                rerotate(kv_here.k, delta, inv_freq, out=cache.k[:, 0, :, start:end])
                cache.v[:, 0, :, start:end] = kv_here.v
            except Exception:  # a cached value that does not fit: compute the chunk instead
                log.warning("stitching a cached chunk failed; computing it", exc_info=True)
                kv = None
        placed.append(kv)
    return placed
