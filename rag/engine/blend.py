"""CacheBlend: stitch precomputed chunk K/V and recompute only the tokens that matter.

Each chunk's K/V was computed right behind the fixed header, so it lacks the attention to the
chunks before it in this prompt. The first chunk sits exactly where it was computed: its K/V is
already exact and gets no budget (unless the budget exceeds all the other chunks). For the
others:

1. The chunk caches are stitched at their new positions (rag.engine.stitch).
2. The question alone runs over the stitched cache, recording how much attention each context
   token gets in every layer (rag.engine.selection).
3. The model's forward runs on the question, any uncached chunk and the top ceil(ratio *
   reused) tokens by that attention; a hook drops the unselected ones at the check layer(s),
   and every layer writes fresh K/V over the stale ones.

Attention is causal by position for every computed token, so a selected token in the middle
never sees later ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from cache.entry import ChunkKV
from rag.engine.prompt import Prompt
from rag.engine.selection import Selector, keep_counts, question_attention
from rag.engine.stitch import stitch
from rag.model.kv_cache import KVCache
from rag.model.transformer import Transformer

# The layer from which only the selected tokens are computed: layers before it run on every
# token of the later chunks. 0, because layer 0's cached K/V are already exact (they depend on
# token and position only), so running it on everything buys nothing.
CHECK_LAYER = 0


@dataclass
class BlendResult:
    logits: torch.Tensor  # [n_footer (or logit_rows), vocab] float32, the question positions
    recomputed: int  # reused (cached) tokens recomputed past the check layer
    computed: int  # tokens computed in the deepest layer (recomputed + always-computed)
    reused: int  # tokens whose K/V came from a chunk cache
    selected: torch.Tensor | None = None  # slots of the recomputed reused tokens
    checks: list[int] = field(default_factory=list)  # layers where tokens were dropped
    layer_tokens: list[int] = field(default_factory=list)  # tokens computed in each layer
    layer_ms: list[float] = field(default_factory=list)  # wall time of each layer


@torch.inference_mode()
def blend_prefill(
    model: Transformer,
    cache: KVCache,
    prompt: Prompt,
    chunk_kvs: Iterable[ChunkKV | None],
    ratio: float,
    check_layer: int = CHECK_LAYER,
    gradual: int = 1,
    logit_rows: int | None = None,
) -> BlendResult:
    """Prefill everything after the (already cached) header by blending chunk caches.

    `cache` holds the header's K/V in slots [0, len(header)). `gradual` > 1 spreads the
    selection over that many check layers, each keeping fewer (CacheBlend's gradual filtering).
    `chunk_kvs` may be a stream; a None is a chunk without a cache, computed in every layer.
    `logit_rows`: logits of the last that many question positions only (None: all of them).
    """
    h, n_total = len(prompt.header), len(prompt)
    cache.ensure(n_total)
    chunk_kvs = stitch(cache, prompt, chunk_kvs, model.inv_freq)
    device = model.device
    n = n_total - h
    cached = torch.zeros(n, dtype=torch.bool, device=device)  # K/V came from a chunk cache
    exact = torch.zeros_like(cached)  # ... computed at this very position: nothing to fix
    for start, kv, chunk in zip(prompt.chunk_starts, chunk_kvs, prompt.chunks, strict=True):
        if kv is not None:
            cached[start - h : start - h + len(chunk)] = True
            exact[start - h : start - h + len(chunk)] = kv.base_position == start
    forced = ~cached  # question + uncached chunks: computed in every layer
    n_reused = int(cached.sum())
    target = math.ceil(ratio * n_reused) if n_reused else 0
    pool = cached & ~exact  # where the recompute budget goes
    if target > int(pool.sum()):
        pool = cached  # more budget than the later chunks hold: the first chunk too
    n_pool = int(pool.sum())
    counts = [min(c, n_pool) for c in keep_counts(ratio, n_reused, max(1, gradual))]
    # One check layer per count. A token dropped right after layer 0 would have bought nothing
    # (layer 0's cached K/V are exact), so after a check at layer 0 the next one is layer 2.
    layers = [check_layer + j for j in range(len(counts))]
    if check_layer == 0:
        layers[1:] = [layer + 1 for layer in layers[1:]]
    if check_layer < 0 or layers[-1] >= model.args.n_layers:
        raise ValueError(f"selection layers {layers} outside the model's {model.args.n_layers}")
    checks = dict(zip(layers, counts, strict=True)) if 0 < target < n_pool else {}
    score = None
    if checks:
        # Rank by the attention the question pays each token in the layers where a kept
        # token's fresh K/V will be read: score[l] sums layers >= l, and at layer 0 (exact
        # K/V) it counts from layer 1.
        seen = torch.cat(
            [torch.ones(h, dtype=torch.bool, device=device), cached[: prompt.context_end - h]]
        )
        mass = question_attention(model, cache, prompt, seen)[:, h:]
        score = mass.flip(0).cumsum(0).flip(0)
        score[0] = score[1]
        score[:, exact] = -1.0  # already exact: last choice
    active = ((forced | pool) if target else forced).nonzero().squeeze(1)
    selector = Selector(score, forced, checks, active)
    ids = torch.tensor([prompt.ids()[h:]], device=device)[:, active]
    ctx = model.context(cache, positions=active + h)
    rows = len(prompt.footer) if logit_rows is None else min(logit_rows, len(prompt.footer))
    x = model.run(ids, ctx, hook=selector, outputs=slice(-rows, None))
    layer_ms = selector.layer_ms()
    active = selector.active
    return BlendResult(
        logits=model.logits(x[0]),
        recomputed=int((~forced[active]).sum()),
        computed=len(active),
        reused=n_reused,
        selected=active[~forced[active]] + h,
        checks=sorted(checks),
        layer_tokens=selector.layer_tokens,
        layer_ms=layer_ms,
    )
