"""Causal attention by slot for any set of query tokens over a K/V buffer.

A prompt from slot 0 uses SDPA's is_causal path; anything else (a prompt over a cached
past, the blend's scattered tokens, a draft tree) runs in groups of queries with an explicit
mask, each group reading keys only up to its last slot. The query heads that share a KV head
run as the rows of one head ("folded"), so K/V are never repeated per head.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTN_GROUP = 64  # queries per masked group: a group reads keys up to its last slot only
# SDPA's CPU kernel skips causally masked work only in blocks of 512 keys: a causal prompt of
# at most that many tokens runs in masked groups, which read only their own prefix.
CAUSAL_BLOCK = 512
# Past this many keys, folded groups on CPU in bf16 attend by float32-score matmuls
# (`_matmul_attend`): SDPA's CPU bf16 softmax costs more per score than a float32 softmax over
# a whole row. Below it the per-group matmuls cost more than they save.
MATMUL_MIN_KEYS = 512
# Folded groups on CUDA avoid cuDNN's kernel, which builds an execution plan per shape (the
# blend's shapes change with every request).
_FOLDED_KERNELS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


@dataclass
class QueryGroup:
    """Queries `rows` read key slots [0, keys), under a `mask` (additive, or bool with True = may
    attend) or is_causal. The mask is [rows, keys], or [fold * rows, keys] when the `fold` query
    heads that share a KV head run as the rows of one head; `matmul` groups attend by
    float32-score matmuls instead of SDPA."""

    rows: slice
    keys: int
    mask: torch.Tensor | None = None
    is_causal: bool = False
    fold: int = 1
    matmul: bool = False


def causal_groups(
    slots: torch.Tensor, contiguous_from: int | None, dtype: torch.dtype, fold: int = 1
) -> list[QueryGroup]:
    """How queries at sorted `slots` that see the keys in slots <= their own attend.

    Built once per forward (every layer attends the same way); folded for `fold` query heads
    per KV head.
    """
    t = len(slots)
    if contiguous_from == 0 and (t > CAUSAL_BLOCK or slots.device.type != "cpu"):
        return [QueryGroup(slice(0, t), t, is_causal=True)]
    if t == 1:
        return [QueryGroup(slice(0, 1), int(slots[0]) + 1)]
    # Additive masks: SDPA's CPU kernel is faster with one in the compute dtype than with a bool
    # one; the matmul attention adds its float32 mask inside the score matmul.
    matmul = fold > 1 and _matmul_attention(slots.device, dtype, int(slots[-1]) + 1)
    if matmul:
        dtype = torch.float32
    groups = []
    for g in range(0, t, ATTN_GROUP):
        group = slots[g : g + ATTN_GROUP]
        end = int(group[-1]) + 1
        hidden = torch.arange(end, device=slots.device)[None, :] > group[:, None]
        mask = torch.zeros(hidden.shape, dtype=dtype, device=slots.device)
        mask.masked_fill_(hidden, float("-inf"))
        groups.append(
            QueryGroup(
                slice(g, g + len(group)), end, mask.repeat(fold, 1), fold=fold, matmul=matmul
            )
        )
    return groups


def _matmul_attention(device: torch.device, dtype: torch.dtype, keys: int) -> bool:
    """Folded masked groups attend by matmuls on CPU in bf16 past MATMUL_MIN_KEYS keys (see
    there); in float32 SDPA is as fast or faster."""
    return device.type == "cpu" and dtype == torch.bfloat16 and keys > MATMUL_MIN_KEYS


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: list[QueryGroup]
) -> torch.Tensor:
    """q [B, H, T, D]; k, v [B, KH, S, D] (the whole buffer); `groups` from causal_groups (or one
    group with a tree's mask)."""
    if groups[0].matmul:
        k_t = (
            k[:, :, : max(g.keys for g in groups)].transpose(-1, -2).float()
        )  # once for all groups
        outs = [
            _matmul_attend(q[:, :, g.rows], k_t[..., : g.keys], v[:, :, : g.keys], g)
            for g in groups
        ]
    else:
        outs = [_attend(q[:, :, g.rows], k[:, :, : g.keys], v[:, :, : g.keys], g) for g in groups]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _folded(q: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """q [B, H, T, D] -> [B, KH, H / KH * T, D]: the query heads that share a KV head as the rows
    of one head, so K/V are never repeated and every kernel takes it."""
    b, h, t, d = q.shape
    return q.reshape(b, n_kv_heads, h // n_kv_heads * t, d)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: QueryGroup) -> torch.Tensor:
    if g.fold == 1:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=g.mask, is_causal=g.is_causal, enable_gqa=True
        )
    with sdpa_kernel(_FOLDED_KERNELS) if q.is_cuda else nullcontext():
        out = F.scaled_dot_product_attention(_folded(q, k.shape[1]), k, v, attn_mask=g.mask)
    return out.reshape(q.shape)  # a copy only where the kernel wrote another layout (CUDA)


def _matmul_attend(
    q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, g: QueryGroup
) -> torch.Tensor:
    """A folded group's attention as matmuls: q [B, H, T, D] (bf16), k_t [B, KH, D, S] float32,
    v [B, KH, S, D]. Scores and softmax in float32 (as in SDPA's kernel), the probabilities
    rounded to q's dtype for the product with V (as SDPA does too), one KV head at a time so
    the [fold * T, S] scores stay in cache."""
    folded = _folded(q, k_t.shape[1]).float()
    out = torch.empty(folded.shape, dtype=q.dtype, device=q.device)
    for i in range(folded.shape[0]):
        for j in range(folded.shape[1]):
            s = torch.addmm(g.mask, folded[i, j], k_t[i, j], alpha=q.shape[-1] ** -0.5)
            torch.softmax(s, -1, out=s)
            torch.mm(s.to(q.dtype), v[i, j], out=out[i, j])
    return out.view(q.shape)


class CausalAttention:
    """Each query sees the keys in slots up to its own: prefill, and the blend's scattered
    tokens. The groups are built on first use (a blend that selects before layer 0 never
    needs the plan for every token)."""

    def __init__(
        self, slots: torch.Tensor, contiguous_from: int | None, dtype: torch.dtype, fold: int
    ):
        self.slots, self.contiguous_from, self.dtype, self.fold = (
            slots,
            contiguous_from,
            dtype,
            fold,
        )
        self._groups: list[QueryGroup] | None = None

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        if self._groups is None:
            self._groups = causal_groups(self.slots, self.contiguous_from, self.dtype, self.fold)
        return causal_attention(q, k, v, self._groups)

    def rows(self, keep: torch.Tensor | slice, slots: torch.Tensor) -> CausalAttention:
        return CausalAttention(slots, None, self.dtype, self.fold)


class MaskedAttention:
    """Every query in one group under an explicit mask [T, S] (bool, True = may attend)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        keys = self.mask.shape[1]
        group = QueryGroup(slice(0, q.shape[2]), keys, self.mask)
        return causal_attention(q, k, v, [group])

    def rows(self, keep: torch.Tensor | slice, slots: torch.Tensor) -> MaskedAttention:
        return MaskedAttention(self.mask[keep])
