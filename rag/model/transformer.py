"""A compact Llama-family decoder with explicit K/V buffers (Llama 2/3, Mistral, Qwen2, SmolLM).

RMSNorm, RoPE, grouped-query attention through `scaled_dot_product_attention`
(masked groups over more than 512 keys on CPU in bf16: float32-score matmuls, faster there),
SwiGLU. Every forward takes token positions (for RoPE) and slots (where its K/V
go in the buffer) explicitly, so the blend can recompute any subset of tokens at
any place and the decoder can verify a draft tree. Checked against transformers'
own logits in tests/test_model.py.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from rag.model.kv_cache import KVCache
from rag.model.linear import Linear

# Query groups for masked attention: each group only reads keys up to its last
# slot, so a causal pass skips about half the key blocks like is_causal does.
ATTN_GROUP = 64  # queries per masked group: a group reads keys up to its last slot only
# SDPA's CPU kernel skips causally masked work in blocks of 512 keys, so a causal prompt of at
# most that many tokens is computed in full; groups read only their own prefix (the scorer's
# 512-token windows: 5.7 against 8.2 ms a layer, bf16, 2 threads; no gain past 1K tokens).
CAUSAL_BLOCK = 512
# Masked groups that read more keys than this attend by float32-score matmuls on CPU in bf16
# (see _matmul_attention); the scorer's windows of at most 512 keys stay on SDPA.
MATMUL_MIN_KEYS = 512
LOSS_ROWS = 128  # token_losses: rows whose logits are computed at once


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float
    qkv_bias: bool
    tie_embeddings: bool
    max_positions: int
    inv_freq: torch.Tensor  # [head_dim // 2], raw (unscaled) RoPE frequencies
    rope_scale: float  # attention factor applied to cos/sin (YaRN etc.), 1.0 for most

    @property
    def q_per_kv(self) -> int:
        """Query heads that share one KV head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf(cls, cfg) -> ModelArgs:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "default":
            theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scale = 1.0
        else:
            inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
        return cls(
            vocab_size=cfg.vocab_size,
            dim=cfg.hidden_size,
            n_layers=cfg.num_hidden_layers,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            ffn_dim=cfg.intermediate_size,
            norm_eps=cfg.rms_norm_eps,
            # Qwen2 has q/k/v biases without saying so in the config.
            qkv_bias=bool(getattr(cfg, "attention_bias", False)) or cfg.model_type == "qwen2",
            tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            max_positions=cfg.max_position_embeddings,
            inv_freq=inv_freq.float(),
            rope_scale=float(scale),
        )


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scale: float = 1.0):
    """cos/sin [n, head_dim] for the given positions (non-interleaved halves, as in HF)."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., n, head_dim]; cos/sin [n, head_dim] (already in x's dtype)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class QueryGroup:
    """Queries `rows` read key slots [0, keys), under a `mask` (additive, or bool with True = may
    attend) or is_causal. The mask is [rows, keys], or [fold * rows, keys] where the `fold` query
    heads that share a KV head run as the rows of one head (see causal_attention); `matmul`
    groups attend by float32-score matmuls instead of SDPA (see _matmul_attend)."""

    rows: slice
    keys: int
    mask: torch.Tensor | None = None
    is_causal: bool = False
    fold: int = 1
    matmul: bool = False


def causal_groups(slots: torch.Tensor, contiguous_from: int | None, dtype: torch.dtype,
                  fold: int = 1) -> list[QueryGroup]:
    """How attention runs for queries at sorted `slots` that see the keys in slots <= their own.

    Built once per forward, as every layer attends the same way. A prompt from slot 0 uses
    SDPA's is_causal fast path (on CPU, past CAUSAL_BLOCK tokens); anything else (a prompt over
    a past, the blend's scattered tokens) runs in groups with a mask, folded for `fold` query
    heads per KV head.
    """
    t = len(slots)
    if contiguous_from == 0 and (t > CAUSAL_BLOCK or slots.device.type != "cpu"):
        return [QueryGroup(slice(0, t), t, is_causal=True)]
    if t == 1:
        return [QueryGroup(slice(0, 1), int(slots[0]) + 1)]
    # Additive masks: SDPA's CPU kernel runs ~20% faster with one in the compute dtype than with
    # a bool one; the matmul attention adds its float32 mask inside the score matmul.
    matmul = fold > 1 and _matmul_attention(slots.device, dtype, int(slots[-1]) + 1)
    if matmul:
        dtype = torch.float32
    groups = []
    for g in range(0, t, ATTN_GROUP):
        group = slots[g:g + ATTN_GROUP]
        end = int(group[-1]) + 1
        hidden = torch.arange(end, device=slots.device)[None, :] > group[:, None]
        mask = torch.zeros(hidden.shape, dtype=dtype, device=slots.device).masked_fill_(hidden, float("-inf"))
        groups.append(QueryGroup(slice(g, g + len(group)), end, mask.repeat(fold, 1), fold=fold, matmul=matmul))
    return groups


def _matmul_attention(device: torch.device, dtype: torch.dtype, keys: int) -> bool:
    """Folded masked groups attend by matmuls (`_matmul_attend`) on CPU in bf16 past
    MATMUL_MIN_KEYS keys: SDPA's CPU kernel spends ~2.4 ns a score on its softmax there, against ~0.7 ns for a
    float32 softmax over a whole row (toggled in one process: blend 0.15 -5.5% at 1 thread and
    -7% at 2, full prefill of 2K tokens -5.4% and -3.4%). Over at most 512 keys (the scorer's
    windows) the matmuls per group and KV head cost more than they save (-5.5% at 2 threads);
    in float32 SDPA is as fast or faster."""
    return device.type == "cpu" and dtype == torch.bfloat16 and keys > MATMUL_MIN_KEYS


# For folded groups on CUDA: not cuDNN's kernel, which builds an execution plan per shape, and
# the blend's shapes change with every request.
_FOLDED_KERNELS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: list[QueryGroup]) -> torch.Tensor:
    """q [B, H, T, D]; k, v [B, KH, S, D] (the whole buffer); `groups` from causal_groups (or one
    group with a tree's mask)."""
    if groups[0].matmul:
        k_t = k[:, :, :max(g.keys for g in groups)].transpose(-1, -2).float()  # once for every group
        outs = [_matmul_attend(q[:, :, g.rows], k_t[..., :g.keys], v[:, :, :g.keys], g) for g in groups]
    else:
        outs = [_attend(q[:, :, g.rows], k[:, :, :g.keys], v[:, :, :g.keys], g) for g in groups]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _folded(q: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """q [B, H, T, D] -> [B, KH, H / KH * T, D]: the query heads that share a KV head as the rows
    of one head, so K/V are never repeated (on CPU ~5% faster than SDPA's enable_gqa for the
    blend's groups, and every kernel takes it)."""
    b, h, t, d = q.shape
    return q.reshape(b, n_kv_heads, h // n_kv_heads * t, d)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: QueryGroup) -> torch.Tensor:
    if g.fold == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, is_causal=g.is_causal, enable_gqa=True)
    with sdpa_kernel(_FOLDED_KERNELS) if q.is_cuda else nullcontext():
        out = F.scaled_dot_product_attention(_folded(q, k.shape[1]), k, v, attn_mask=g.mask)
    return out.reshape(q.shape)  # a copy only where the kernel wrote another layout (CUDA)


def _matmul_attend(q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, g: QueryGroup) -> torch.Tensor:
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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        self.attn_norm = RMSNorm(a.dim, a.norm_eps)
        self.wqkv = Linear(a.dim, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim, bias=a.qkv_bias)
        self.wo = Linear(a.n_heads * a.head_dim, a.dim, bias=False)
        self.mlp_norm = RMSNorm(a.dim, a.norm_eps)
        self.w_gate = Linear(a.dim, a.ffn_dim, bias=False)
        self.w_up = Linear(a.dim, a.ffn_dim, bias=False)
        self.w_down = Linear(a.ffn_dim, a.dim, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, dim] -> rotated q [B, H, T, D], rotated k and v [B, KH, T, D]."""
        a = self.a
        b, t, _ = x.shape
        qkv = self.wqkv(self.attn_norm(x))
        q, k, v = qkv.split([a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim,
                             a.n_kv_heads * a.head_dim], dim=-1)
        q = q.view(b, t, a.n_heads, a.head_dim).transpose(1, 2)
        k = k.view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = v.view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection, residual and SwiGLU MLP. attn [B, H, T, D]."""
        b, _, t, _ = attn.shape
        x = x + self.wo(attn.transpose(1, 2).reshape(b, t, -1))
        h = self.mlp_norm(x)
        return self.w_down.run(self.w_up.run(h, "mul", self.w_gate.run(h, "swish")), "add", x)


class Transformer(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.embed = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.lm_head = Linear(a.dim, a.vocab_size, bias=False)
        if a.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", a.inv_freq.clone(), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        a = self.args
        return KVCache.allocate(a.n_layers, a.n_kv_heads, a.head_dim, max_len,
                                batch=batch, dtype=self.dtype, device=self.device)

    def pack(self) -> None:
        """Pack every linear layer's weight for this device and dtype (after loading or moving)."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.pack()

    def rope(self, positions: torch.Tensor):
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.args.rope_scale)
        return cos.to(self.dtype), sin.to(self.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h)).float()

    @torch.inference_mode()
    def token_losses(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (float32 [N]) of `targets` [N] under the last hidden states `h` [N, dim].

        In the model's dtype: with no [N, vocab] float32 copy, a bf16 log-softmax over the 49k
        vocabulary took a third of the time on one corpus (1.9 s vs 5.6 s), and errs by ~0.02
        nats per token on average (at most ~0.08), about what the bf16 logits themselves carry.
        LOSS_ROWS rows at a time: their logits (25 MB in float32) stay in the L3 cache for the
        softmax, where 1,024 rows' (200 MB) went through memory twice more (float32 on an AVX2
        CPU: the loss cost 30% on top of the lm_head; now ~0).
        """
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], LOSS_ROWS):
            logits = self.lm_head(self.norm(h[i:i + LOSS_ROWS]))
            out[i:i + LOSS_ROWS] = F.cross_entropy(logits, targets[i:i + LOSS_ROWS], reduction="none")
        return out

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        cache: KVCache,
        start: int | None = None,
        *,
        positions: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        logits_for: slice | torch.Tensor | None = slice(-1, None),
    ) -> torch.Tensor:
        """Run tokens `ids` [B, T] through every layer, writing their K/V into `cache`.

        Either `start` (a contiguous span: positions = slots = start..start+T) or
        explicit `positions` / `slots` [T] (slots default to positions). `mask`
        [T, S] (bool, True = may attend) overrides causal-by-slot attention over
        slots [0, S), for tree verification. Returns float32 logits [B, n, V] for
        the rows picked by `logits_for`; with None, the last layer's hidden states [B, T, dim]
        (for `token_losses`).
        """
        t = ids.shape[1]
        if start is not None:
            positions = torch.arange(start, start + t, device=ids.device)
        slots = positions if slots is None else slots
        end = int(slots.max()) + 1
        cache.ensure(end)
        contiguous = start if (start is not None and mask is None) else None
        write = slice(start, start + t) if contiguous is not None else slots
        cos, sin = self.rope(positions)
        if mask is None:
            groups = causal_groups(slots, contiguous, self.dtype, self.args.q_per_kv)
        else:  # a tree: every query in one group, under the given mask
            groups = [QueryGroup(slice(0, t), mask.shape[1], mask)]
        x = self.embed(ids)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(x, cos, sin)
            cache.write(i, write, k, v)
            x = layer.finish(x, causal_attention(q, cache.k[i], cache.v[i], groups))
        cache.length = max(cache.length, end)
        return x if logits_for is None else self.logits(x[:, logits_for])
