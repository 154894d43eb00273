"""CacheBlend: stitch precomputed chunk K/V and recompute only the tokens that matter.

Each chunk's K/V was computed right behind the fixed header, so it lacks the
attention to the chunks before it in this prompt. The first chunk sits exactly
where it was computed: its K/V is already exact and gets no budget (unless the
budget exceeds all the other chunks). For the others:

1. A cheap pass of the question alone over the stitched cache records how much
   attention each context token gets from the question in every layer.
2. The reused tokens are ranked by that attention, summed over the layers where a
   recomputed token's fresh K/V will be read; the top ceil(ratio * reused) are kept.
3. Every layer computes only them plus the question (and any uncached chunk),
   writing fresh K/V over the stale ones; `check_layer` > 0 first runs that many
   layers on all tokens of the later chunks, `gradual` shrinks the set over layers.

`selection="deviation"` is CacheBlend's own rule, kept to measure against: the
later chunks run in full up to the check layer (default 1), which ranks them by
how far their fresh K/V moved from the cached ones.

Why not rank by K/V deviation at a check layer, as CacheBlend does: on 12
real-text prompts (4 x 512 tokens, ratio 0.15) the mean KL to full prefill was
0.093 with no recompute, 0.085 with random tokens, 0.074 with K+V deviation at
layer 1, 0.060 at layer 3, and 0.033 with this ranking, with no full layer at
all. One early layer's deviation says little about the tokens the question
actually reads: even the true deviation summed over all layers only reached
0.054. The question's attention over the stale cache is a good estimate of its
attention over the exact one (Spearman ~0.9). Numbers: eval/RESULTS_ttft.md.

Attention is causal by position for every computed token, so a selected token
in the middle never sees later ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from cache.entry import ChunkKV
from rag.engine.prompt import Prompt
from rag.model.kv_cache import KVCache
from rag.model.transformer import Transformer, causal_attention, causal_groups, rope_cos_sin

# Measured defaults (eval/RESULTS_ttft.md). Layers run on all tokens before selecting: each
# costs 1/30 of a full prefill, and layer 0 buys nothing (its cached K/V are already exact).
CHECK_LAYER = 0
ROTATE_LAYERS = 2  # layers re-rotated at a time: a 512-token chunk's float32 temporaries stay in cache
SELECTIONS = ("attention", "deviation")


@dataclass
class BlendResult:
    logits: torch.Tensor  # [n_footer, vocab] float32, for the question positions
    recomputed: int  # reused (cached) tokens recomputed past the check layer
    computed: int  # tokens computed in the deepest layer (recomputed + always-computed)
    reused: int  # tokens whose K/V came from a chunk cache
    selected: torch.Tensor | None = None  # slots of the recomputed reused tokens
    checks: list[int] = field(default_factory=list)  # layers where tokens were dropped
    layer_tokens: list[int] = field(default_factory=list)  # tokens computed in each layer
    layer_ms: list[float] = field(default_factory=list)  # wall time of each layer


def rerotate(k: torch.Tensor, delta: int, inv_freq: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Keys rotated at positions p -> rotated at p + delta (exact: rotations compose).

    k [n_layers, ...]. Computed in float32 (16-bit keys are promoted) and rounded once, into
    `out` (a slice of the request buffer; float32 if not given). One delta for all keys, so the
    rotation is a 2x2 on the two halves with scalar cos/sin per frequency: no full-size
    temporaries (5x faster than apply_rope here), and a couple of layers at a time, so the
    float32 temporaries stay in cache (2.5x faster than all layers at once). Uses the raw
    inverse frequencies: any attention scaling of cos/sin (YaRN) is already inside k and must
    not be applied twice.
    """
    out = torch.empty(k.shape, dtype=torch.float32, device=k.device) if out is None else out
    if delta == 0:
        return out.copy_(k)
    half = k.shape[-1] // 2
    cos, sin = rope_cos_sin(inv_freq.to(k.device), torch.tensor([delta], device=k.device))
    c, s = cos[0, :half], sin[0, :half]  # rope_cos_sin repeats its halves
    for i in range(0, k.shape[0], ROTATE_LAYERS):
        part, o = k[i:i + ROTATE_LAYERS].float(), out[i:i + ROTATE_LAYERS]
        k1, k2 = part[..., :half], part[..., half:]
        o[..., :half] = k1 * c - k2 * s
        o[..., half:] = k2 * c + k1 * s
    return out


def stitch(cache: KVCache, prompt: Prompt, chunk_kvs: Iterable[ChunkKV | None],
           inv_freq: torch.Tensor) -> list[ChunkKV | None]:
    """Place each cached chunk's K/V at its position in this prompt (an uncached chunk's slots
    keep the buffer's zeros until the blend computes them).

    `chunk_kvs` may be a stream (a generator over a store's in-flight loads): each chunk is
    placed as soon as it arrives, while the later ones are still loading. Returns them all.
    """
    cache.ensure(prompt.context_end)
    placed = []
    for start, kv, chunk in zip(prompt.chunk_starts, chunk_kvs, prompt.chunks, strict=True):
        placed.append(kv)
        if kv is not None:
            kv, end = kv.to(cache.k.device), start + len(chunk)
            rerotate(kv.k, start - kv.base_position, inv_freq, out=cache.k[:, 0, :, start:end])
            cache.v[:, 0, :, start:end] = kv.v
    return placed


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
    t, rep = len(slots), a.q_per_kv
    cos, sin = model.rope(slots)
    x = model.embed(torch.tensor([prompt.footer], device=model.device))
    unseen = (~visible).nonzero().squeeze(1)  # context slots without K/V (uncached chunks)
    later = torch.ones(t, t, dtype=torch.bool, device=model.device).triu(1)  # causal among the question
    mass = []
    for i, layer in enumerate(model.layers):
        q, k, v = layer.qkv(x, cos, sin)
        cache.write(i, slots, k, v)
        # Explicit attention, as SDPA does not return the weights. Query heads that share a KV
        # head become rows of one matrix: [KH, rep * T, D], so K is never copied per head. In
        # the model's dtype: softmax computes in float32 inside, and a ranking needs no more.
        qg = q.reshape(a.n_kv_heads, rep * t, a.head_dim) * a.head_dim ** -0.5
        s = torch.bmm(qg, cache.k[i, 0, :, :end].transpose(-1, -2))
        s[..., start:].view(a.n_kv_heads, rep, t, t).masked_fill_(later, float("-inf"))
        if len(unseen):
            s[..., unseen] = float("-inf")
        p = s.softmax(-1)
        mass.append(p.sum(1).float().sum(0) / (a.n_heads * t))
        if i + 1 < len(model.layers):  # the last layer's output is not needed
            out = p @ cache.v[i, 0, :, :end]
            x = layer.finish(x, out.view(1, a.n_heads, t, a.head_dim))
    return torch.stack(mass)


def _top(score: torch.Tensor, forced: torch.Tensor, n_reused: int) -> torch.Tensor:
    """Indices (in order) of the forced tokens plus the n_reused best-scoring others."""
    n_keep = min(len(score), int(forced.sum()) + n_reused)
    return score.masked_fill(forced, float("inf")).topk(n_keep).indices.sort().values


@torch.inference_mode()
def blend_prefill(
    model: Transformer,
    cache: KVCache,
    prompt: Prompt,
    chunk_kvs: Iterable[ChunkKV | None],
    ratio: float,
    check_layer: int | None = None,
    gradual: int = 1,
    selection: str = "attention",
) -> BlendResult:
    """Prefill everything after the (already cached) header by blending chunk caches.

    `cache` holds the header's K/V in slots [0, len(header)). Layers before `check_layer`
    run on every token of the later chunks (refreshing their K/V there); from it on, only
    the selected ones. `gradual` > 1 spreads the selection over that many layers, each
    keeping fewer (CacheBlend's gradual filtering).

    `selection="attention"` (default) ranks by the question's attention over the stale cache;
    `"deviation"` is the paper's rule: the check layer runs on all of them and ranks them by
    how far their fresh K/V are from the cached ones (check_layer >= 1, default 1, as layer
    0's cached K/V are already exact).
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    by_deviation = selection == "deviation"
    if check_layer is None:
        check_layer = 1 if by_deviation else CHECK_LAYER
    if by_deviation and check_layer < 1:
        raise ValueError("deviation selection needs check_layer >= 1: layer 0's K/V do not deviate")
    h, n_total = len(prompt.header), len(prompt)
    cache.ensure(n_total)
    chunk_kvs = stitch(cache, prompt, chunk_kvs, model.inv_freq)
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
    # Selection layers: check_layer, then one per layer. A token dropped right after layer 0
    # would have bought nothing (layer 0's cached K/V are exact), so then the second is layer 2.
    layers = [check_layer + j for j in range(len(counts))]
    if check_layer == 0 and not by_deviation:
        layers[1:] = [layer + 1 for layer in layers[1:]]
    if check_layer < 0 or layers[-1] >= model.args.n_layers:
        raise ValueError(f"selection layers {layers} outside the model's {model.args.n_layers}")
    checks = dict(zip(layers, counts, strict=True)) if 0 < target < n_pool else {}
    if checks and not by_deviation:
        # Rank by the attention the question pays each token in the layers where a kept token's
        # fresh K/V will be read (layer 0's cached K/V depend on token and position only: exact).
        seen = torch.cat([torch.ones(h, dtype=torch.bool, device=device), cached[:prompt.context_end - h]])
        mass = question_attention(model, cache, prompt, seen)[:, h:]
        after = mass.flip(0).cumsum(0).flip(0)  # after[l] = sum over layers >= l
        after[:, exact] = -1.0  # already exact: last choice
    active = ((forced | pool) if target else forced).nonzero().squeeze(1)
    cos_all, sin_all = model.rope(torch.arange(h, n_total, device=device))
    x = model.embed(torch.tensor([prompt.ids()[h:]], device=device)[:, active])
    n_footer = len(prompt.footer)
    fold = model.args.q_per_kv
    layer_tokens, layer_ms = [], []

    def place(active: torch.Tensor):
        """What every layer needs about the computed tokens; rebuilt only when they change."""
        positions = active + h
        return positions, cos_all[active], sin_all[active], causal_groups(positions, None, model.dtype, fold)

    if not (0 in checks and not by_deviation):  # else layer 0 selects first: no masks for every token
        positions, cos, sin, groups = place(active)
    for i, layer in enumerate(model.layers):
        t0 = time.perf_counter()
        if i in checks and not by_deviation:
            keep = _top(after[max(i, 1), active], forced[active], checks[i])
            active, x = active[keep], x[:, keep]
            positions, cos, sin, groups = place(active)
        q, k, v = layer.qkv(x, cos, sin)
        deviation_check = i in checks and by_deviation
        if deviation_check:  # how far each token's fresh K/V moved from the cached ones, in this layer
            old_k, old_v = cache.k[i, 0][:, positions], cache.v[i, 0][:, positions]
            score = ((k[0] - old_k).norm(dim=-1) + (v[0] - old_v).norm(dim=-1)).sum(0)
        cache.write(i, positions, k, v)  # fresh K/V over the stale ones (at a deviation check: all)
        if deviation_check:
            keep = _top(score.masked_fill(exact[active], -1.0), forced[active], checks[i])
            active, x, q = active[keep], x[:, keep], q[:, :, keep]
            positions, cos, sin, groups = place(active)
        if i == len(model.layers) - 1:  # past the last K/V, only the question's outputs matter
            q, x = q[:, :, -n_footer:], x[:, -n_footer:]
            groups = causal_groups(positions[-n_footer:], None, model.dtype, fold)
        x = layer.finish(x, causal_attention(q, cache.k[i], cache.v[i], groups))
        layer_tokens.append(len(active))
        layer_ms.append(1000 * (time.perf_counter() - t0))

    cache.length = max(cache.length, n_total)
    return BlendResult(
        logits=model.logits(x[0]),
        recomputed=int((~forced[active]).sum()),
        computed=len(active),
        reused=n_reused,
        selected=active[~forced[active]] + h,
        checks=sorted(checks),
        layer_tokens=layer_tokens,
        layer_ms=layer_ms,
    )
