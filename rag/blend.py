"""CacheBlend: stitch precomputed chunk K/V and recompute only the tokens that matter.

Each chunk's K/V was computed behind the fixed header, so it lacks attention to
the chunks before it in this prompt. Blending recomputes every token in the
first layer(s); at the check layer it ranks the reused tokens by how far their
cached K/V deviate from fresh ones and keeps the top `ratio`; deeper layers
compute only those tokens (plus the question and any uncached token), writing
their fresh K/V into the stitched cache. Attention is causal by position for
every computed token, so a selected token in the middle never sees later ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cache.entry import ChunkKV
from rag.kv_cache import KVCache
from rag.model import Transformer, apply_rope, causal_attention, rope_cos_sin
from rag.prompt import Prompt


@dataclass
class BlendResult:
    logits: torch.Tensor  # [n_footer, vocab] float32, for the question positions
    recomputed: int  # reused (cached) tokens recomputed past the check layer
    computed: int  # tokens computed in the deepest layer (recomputed + always-computed)
    reused: int  # tokens whose K/V came from a chunk cache


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
        k = rerotate(kv.k.to(cache.k.device), start - kv.base_position, inv_freq)
        cache.load(start, k.to(cache.k.dtype), kv.v.to(device=cache.v.device, dtype=cache.v.dtype))


def keep_counts(ratio: float, n_reused: int, n_checks: int) -> list[int]:
    """Reused tokens kept after each check layer; gradual filtering shrinks linearly to the target."""
    target = math.ceil(ratio * n_reused)
    return [min(n_reused, math.ceil(target * (n_checks - j))) for j in range(n_checks)]


@torch.inference_mode()
def blend_prefill(
    model: Transformer,
    cache: KVCache,
    prompt: Prompt,
    chunk_kvs: list[ChunkKV | None],
    ratio: float,
    check_layer: int = 1,
    gradual: int = 1,
) -> BlendResult:
    """Prefill everything after the (already cached) header by blending chunk caches.

    `cache` holds the header's K/V in slots [0, len(header)). `gradual` > 1 spreads the
    selection over that many check layers, starting at `check_layer`, each keeping fewer.
    """
    h, n_total = len(prompt.header), len(prompt)
    cache.ensure(n_total)
    stitch(cache, prompt, chunk_kvs, model.inv_freq)
    device = model.device
    ids = torch.tensor([prompt.ids()[h:]], device=device)
    n = n_total - h
    forced = torch.ones(n, dtype=torch.bool, device=device)  # question + uncached chunks
    for start, kv, chunk in zip(prompt.chunk_starts, chunk_kvs, prompt.chunks, strict=True):
        if kv is not None:
            forced[start - h:start - h + len(chunk)] = False
    n_reused = int((~forced).sum())
    n_checks = max(1, gradual)
    if ratio <= 0 or n_reused == 0:
        check_layers: dict[int, int] = {}
        active = forced.nonzero().squeeze(1)  # only these tokens, from the first layer on
    else:
        counts = keep_counts(ratio, n_reused, n_checks)
        check_layers = {check_layer + j: c for j, c in enumerate(counts)}
        active = torch.arange(n, device=device)
    positions = active + h
    cos_all, sin_all = model.rope(torch.arange(h, n_total, device=device))
    x = model.embed(ids[:, active])

    for i, layer in enumerate(model.layers):
        cos, sin = cos_all[active], sin_all[active]
        q, k, v = layer.qkv(x, cos, sin)
        if i in check_layers:
            # Rank reused tokens by the deviation of their cached K/V from fresh ones.
            dev = ((k.float() - cache.k[i, :, :, positions].float()).pow(2).sum((1, 3))
                   + (v.float() - cache.v[i, :, :, positions].float()).pow(2).sum((1, 3)))[0]
            import os
            score = os.environ.get("SCORE", "dev")
            if score != "dev":
                nf = len(prompt.footer)
                kf = cache.k[i, :, :, :n_total].clone(); kf[:, :, positions] = k
                qf = q[:, :, -nf:].float()
                kk = kf.float().repeat_interleave(qf.shape[1] // kf.shape[1], 1)
                att = torch.softmax(qf @ kk.transpose(-1, -2) / qf.shape[-1] ** 0.5 + torch.where(torch.arange(n_total)[None, :] <= positions[-nf:, None], 0.0, float("-inf")), -1)
                a = att.mean((0, 1, 2))[positions]
                if score == "attn":
                    dev = a
                elif score == "devattn":
                    dev = dev * a
                elif score == "sqrt":
                    dev = dev.sqrt() * a
                elif score == "first":
                    dev = -positions.float()
            dev[forced[active]] = float("inf")
            n_keep = int(forced[active].sum()) + check_layers[i]
            keep = dev.topk(n_keep).indices.sort().values
            cache.write(i, positions, k, v)  # fresh K/V for every token computed here
            active, positions, x, q = active[keep], positions[keep], x[:, keep], q[:, :, keep]
        else:
            cache.write(i, positions, k, v)
        attn = causal_attention(q, cache.k[i], cache.v[i], positions, None)
        x = layer.finish(x, attn)

    n_footer = len(prompt.footer)
    cache.length = max(cache.length, n_total)
    return BlendResult(
        logits=model.logits(x[0, -n_footer:]),
        recomputed=int((~forced[active]).sum()),
        computed=len(active),
        reused=n_reused,
    )
