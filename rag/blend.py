"""CacheBlend: stitch precomputed chunk K/V and recompute only the tokens that matter.

Each chunk's K/V was computed right behind the fixed header, so it lacks the
attention to the chunks before it in this prompt. The first chunk sits exactly
where it was computed: its K/V is already exact and it is never recomputed
(unless the budget exceeds all the other chunks). For the others:

1. A cheap pass of the question alone over the stitched cache records how much
   attention each context token gets from the question in every layer. The stale
   cache is good enough for this: its ranking matches full prefill's (Spearman ~0.9).
2. The first layers run on every token of the later chunks, up to the check layer,
   whose fresh K/V are compared with the cached ones.
3. Tokens are ranked by (attention from the question in the layers after the check)
   x (deviation of their K/V); the top ceil(ratio * reused) are kept, and the deeper
   layers compute only them plus the question, writing fresh K/V into the cache.

Why not deviation alone (CacheBlend's code): on 6 real-text prompts of 4 x 512
tokens, ratio 0.15, mean KL to full prefill was 0.087 with no recompute, 0.079
with random tokens, 0.069 with K+V deviation at layer 1, and 0.04 with the
question-attention ranking: the question reads a few tokens heavily, and one
early layer's deviation says little about those (see eval/RESULTS_ttft.md).

Attention is causal by position for every computed token, so a selected token
in the middle never sees later ones.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from cache.entry import ChunkKV
from rag.kv_cache import KVCache
from rag.model import Transformer, apply_rope, causal_attention, rope_cos_sin
from rag.prompt import Prompt

# Defaults measured by eval/bench_ttft.py (see eval/RESULTS_ttft.md).
CHECK_LAYER = 0  # layers run on every token of the later chunks before selecting
QUERY_GROUP = 64  # queries per masked-attention call in the blend


@dataclass
class BlendResult:
    logits: torch.Tensor  # [n_footer, vocab] float32, for the question positions
    recomputed: int  # reused (cached) tokens recomputed past the check layer
    computed: int  # tokens computed in the deepest layer (recomputed + always-computed)
    reused: int  # tokens whose K/V came from a chunk cache
    checks: list[int] = field(default_factory=list)  # layers where tokens were dropped
    layer_tokens: list[int] = field(default_factory=list)  # tokens computed in each layer
    layer_ms: list[float] = field(default_factory=list)  # wall time of each layer


def rerotate(k: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys rotated at positions p -> rotated at p + delta (exact: rotations compose).

    Uses the raw inverse frequencies: any attention scaling of cos/sin (YaRN) is
    already inside k and must not be applied twice.
    """
    if delta == 0:
        return k
    cos, sin = rope_cos_sin(inv_freq.to(k.device), torch.tensor([delta], device=k.device))
    return apply_rope(k.float(), cos, sin).to(k.dtype)


def stitch(cache: KVCache, prompt: Prompt, chunk_kvs: list[ChunkKV | None], inv_freq: torch.Tensor) -> None:
    """Place each cached chunk's K/V at its position in this prompt."""
    for start, kv in zip(prompt.chunk_starts, chunk_kvs, strict=True):
        if kv is None:
            continue
        # Rotate in the cache's dtype: rotating bf16 keys and rounding back to bf16 adds error.
        k = rerotate(kv.k.to(device=cache.k.device, dtype=cache.k.dtype), start - kv.base_position, inv_freq)
        cache.load(start, k, kv.v.to(device=cache.v.device, dtype=cache.v.dtype))


def keep_counts(ratio: float, n_reused: int, n_checks: int) -> list[int]:
    """Reused tokens kept after each check layer; gradual filtering shrinks linearly to the target."""
    target = math.ceil(ratio * n_reused)
    return [min(n_reused, math.ceil(target * (n_checks - j))) for j in range(n_checks)]


def question_attention(model: Transformer, cache: KVCache, prompt: Prompt,
                       visible: torch.Tensor) -> torch.Tensor:
    """[n_layers, len(prompt)]: the attention each slot gets from the question tokens in each
    layer (mean over heads and question tokens), running the question alone over `cache`,
    where only the context slots marked `visible` [context_end] hold K/V.

    Writes the question's K/V into its slots (the blend overwrites them).
    """
    a = model.args
    start, end = prompt.context_end, len(prompt)
    slots = torch.arange(start, end, device=model.device)
    t, rep = len(slots), a.n_heads // a.n_kv_heads
    cos, sin = model.rope(slots)
    x = model.embed(torch.tensor([prompt.footer], device=model.device))
    seen = torch.cat([visible, torch.ones(t, dtype=torch.bool, device=model.device)])
    hidden = ((torch.arange(end, device=model.device)[None, :] > slots[:, None]) | ~seen).repeat(rep, 1)
    mass = []
    for i, layer in enumerate(model.layers):
        q, k, v = layer.qkv(x, cos, sin)
        cache.write(i, slots, k, v)
        # Explicit attention, as SDPA does not return the weights. Query heads that share a KV
        # head become rows of one matrix: [1, KH, rep * T, D], so K is never copied per head.
        qg = q.reshape(1, a.n_kv_heads, rep * t, a.head_dim)
        s = (qg @ cache.k[i, :, :, :end].transpose(-1, -2)).float() * a.head_dim ** -0.5
        p = s.masked_fill_(hidden, float("-inf")).softmax(-1)
        mass.append(p.mean((0, 1, 2)))
        out = p.to(v.dtype) @ cache.v[i, :, :, :end]
        x = layer.finish(x, out.view(1, a.n_heads, t, a.head_dim))
    return torch.stack(mass)


def attend(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """causal_attention over scattered query slots, in groups of QUERY_GROUP: a group reads
    every key up to its last slot, so small groups waste less on masked-out keys."""
    if len(slots) <= QUERY_GROUP:
        return causal_attention(q, k_buf, v_buf, slots, None)
    return torch.cat([causal_attention(q[:, :, g:g + QUERY_GROUP], k_buf, v_buf, slots[g:g + QUERY_GROUP], None)
                      for g in range(0, len(slots), QUERY_GROUP)], dim=2)


@torch.inference_mode()
def blend_prefill(
    model: Transformer,
    cache: KVCache,
    prompt: Prompt,
    chunk_kvs: list[ChunkKV | None],
    ratio: float,
    check_layer: int = CHECK_LAYER,
    gradual: int = 1,
) -> BlendResult:
    """Prefill everything after the (already cached) header by blending chunk caches.

    `cache` holds the header's K/V in slots [0, len(header)). Layers before `check_layer`
    run on every token of the later chunks; from it on, only the selected ones. `gradual`
    > 1 spreads the selection over that many layers, each keeping fewer (CacheBlend's
    gradual filtering).
    """
    h, n_total = len(prompt.header), len(prompt)
    cache.ensure(n_total)
    stitch(cache, prompt, chunk_kvs, model.inv_freq)
    device = model.device
    n = n_total - h
    cached = torch.zeros(n, dtype=torch.bool, device=device)  # K/V came from a chunk cache
    exact = torch.zeros_like(cached)  # ... computed at this very position: nothing to fix
    for start, kv, chunk in zip(prompt.chunk_starts, chunk_kvs, prompt.chunks, strict=True):
        if kv is not None:
            cached[start - h:start - h + len(chunk)] = True
            exact[start - h:start - h + len(chunk)] = kv.base_position == start
    forced = ~cached  # question + uncached chunks: computed in every layer
    n_reused = int(cached.sum())
    target = math.ceil(ratio * n_reused) if n_reused else 0
    pool = cached & ~exact  # where the recompute budget goes
    if target > int(pool.sum()):
        pool = cached  # more budget than the later chunks hold: the first chunk too
    n_pool = int(pool.sum())
    counts = [min(c, n_pool) for c in keep_counts(ratio, n_reused, max(1, gradual))]
    checks = {check_layer + j: c for j, c in enumerate(counts)} if 0 < target < n_pool else {}
    if checks:
        # Rank by the attention the question pays each token in the layers from the one after
        # the check on, where a kept token's fresh K/V will be read.
        seen = torch.cat([torch.ones(h, dtype=torch.bool, device=device), cached[:prompt.context_end - h]])
        mass = question_attention(model, cache, prompt, seen)[:, h:]
        after = mass.flip(0).cumsum(0).flip(0)  # after[l] = sum over layers >= l
        after[:, exact] = -1.0  # already exact: last choice
        after[:, forced] = float("inf")
    active = ((forced | pool) if target else forced).nonzero().squeeze(1)
    cos_all, sin_all = model.rope(torch.arange(h, n_total, device=device))
    x = model.embed(torch.tensor([prompt.ids()[h:]], device=device)[:, active])
    layer_tokens, layer_ms = [], []

    for i, layer in enumerate(model.layers):
        t0 = time.perf_counter()
        if i in checks:
            score = after[min(i + 1, len(after) - 1), active]
            n_keep = min(len(active), int(forced[active].sum()) + checks[i])
            keep = score.topk(n_keep).indices.sort().values
            active, x = active[keep], x[:, keep]
        positions = active + h
        q, k, v = layer.qkv(x, cos_all[active], sin_all[active])
        cache.write(i, positions, k, v)  # fresh K/V over the stale ones
        x = layer.finish(x, attend(q, cache.k[i], cache.v[i], positions))
        layer_tokens.append(len(active))
        layer_ms.append(1000 * (time.perf_counter() - t0))

    n_footer = len(prompt.footer)
    cache.length = max(cache.length, n_total)
    return BlendResult(
        logits=model.logits(x[0, -n_footer:]),
        recomputed=int((~forced[active]).sum()),
        computed=len(active),
        reused=n_reused,
        checks=sorted(checks),
        layer_tokens=layer_tokens,
        layer_ms=layer_ms,
    )
