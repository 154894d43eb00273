"""A compact Llama-family decoder with explicit K/V buffers (Llama 2/3, Mistral, Qwen2, SmolLM).

One forward (`run`) for everything: a prompt's prefill, a chunk's K/V, the blend's question
pass and selective recompute, the scorer's batched windows and the PyTorch decode step. Each
call passes a `Context` that says where its tokens are and how they attend, and optionally a
per-layer hook (the blend uses one to keep only its selected tokens). Checked against
transformers' own logits in tests/test_model.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from rag.model.args import ModelArgs
from rag.model.attention import CausalAttention, MaskedAttention
from rag.model.context import Context
from rag.model.kv_cache import KVCache
from rag.model.layers import Block, RMSNorm, rope_cos_sin
from rag.model.linear import Linear

# A per-thread callback run before each layer of every forward on that thread: a scheduler
# uses it to run a prefill in bounded pieces between decode steps (rag.engine.scheduler).
_between_layers = threading.local()

LOSS_ROWS = 128  # token_losses: rows whose logits are computed at once (they stay in cache)

# Called before each layer with its index, the hidden states of the tokens computed so far and
# their Context; returns the ones the layer computes (the blend drops unselected tokens here).
LayerHook = Callable[[int, torch.Tensor, Context], tuple[torch.Tensor, Context]]


@contextmanager
def between_layers(fn: Callable[[], None]) -> Iterator[None]:
    """Call fn before each layer of every forward this thread runs inside the block."""
    _between_layers.fn = fn
    try:
        yield
    finally:
        _between_layers.fn = None


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
        return KVCache.allocate(
            a.n_layers,
            a.n_kv_heads,
            a.head_dim,
            max_len,
            batch=batch,
            dtype=self.dtype,
            device=self.device,
        )

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

        In the model's dtype, with no [N, vocab] float32 copy (a bf16 log-softmax errs by about
        what the bf16 logits themselves carry), LOSS_ROWS rows at a time so their logits stay
        in cache for the softmax.
        """
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], LOSS_ROWS):
            logits = self.lm_head(self.norm(h[i : i + LOSS_ROWS]))
            rows = targets[i : i + LOSS_ROWS]
            out[i : i + LOSS_ROWS] = F.cross_entropy(logits, rows, reduction="none")
        return out

    def context(
        self,
        cache: KVCache,
        start: int | None = None,
        n: int | None = None,
        *,
        positions: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> Context:
        """The Context of n tokens: a contiguous span (`start`: positions = slots =
        start..start+n), or explicit `positions` and `slots` (default: the positions). Causal by
        slot, or under `mask` [n, S] (bool, True = may attend) over slots [0, S)."""
        if start is not None:
            positions = torch.arange(start, start + n, device=self.device)
        where = (
            slice(start, start + n)
            if start is not None
            else (positions if slots is None else slots)
        )
        cos, sin = self.rope(positions)
        if mask is not None:
            attention = MaskedAttention(mask)
        else:
            slot_ids = positions if slots is None else slots
            attention = CausalAttention(slot_ids, start, self.dtype, self.args.q_per_kv)
        ctx = Context(cache, positions, where, cos, sin, attention)
        cache.ensure(ctx.end)
        return ctx

    @torch.inference_mode()
    def run(
        self,
        ids: torch.Tensor,
        ctx: Context,
        hook: LayerHook | None = None,
        outputs: slice | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The forward pass: tokens `ids` [B, T] through every layer, their K/V into ctx's
        buffer. Returns the last hidden states [B, n, dim] of the `outputs` rows (all rows if
        None); past the last layer's K/V only those rows are computed (none for slice(0, 0))."""
        x = self.embed(ids)
        end, last = ctx.end, len(self.layers) - 1
        pace = getattr(_between_layers, "fn", None)
        for i, layer in enumerate(self.layers):
            if pace is not None:
                pace()
            if hook is not None:
                x, ctx = hook(i, x, ctx)
            q, k, v = layer.qkv(x, ctx.cos, ctx.sin)
            ctx.store(i, k, v)
            if i == last and outputs is not None:
                q, x, ctx = q[:, :, outputs], x[:, outputs], ctx.rows(outputs)
                if x.shape[1] == 0:
                    break
            x = layer.finish(x, ctx.attend(i, q))
        ctx.finish(end)
        return x

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
        """`run` over `context(...)`: float32 logits [B, n, V] of the rows `logits_for` picks,
        or with None the last hidden states of every row [B, T, dim] (for `token_losses`)."""
        ctx = self.context(cache, start, ids.shape[1], positions=positions, slots=slots, mask=mask)
        h = self.run(ids, ctx, outputs=logits_for)
        return h if logits_for is None else self.logits(h)
