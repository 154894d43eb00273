"""The layer math of a Llama-family decoder: RMSNorm, RoPE, one block's projections and MLP.

Attention itself is left to the caller (`Transformer.run` hands it to the forward's
`Context`), so every way of attending (causal prefill, the blend's scattered tokens, the
question pass that records attention weights, a decode step's draft tree) shares this math.
"""

from __future__ import annotations

import torch
from torch import nn

from rag.model.args import ModelArgs
from rag.model.linear import Linear


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
        q, k, v = qkv.split(
            [a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim], dim=-1
        )
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
