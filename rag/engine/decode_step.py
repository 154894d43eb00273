"""The decode-time forward pass: a few tokens at contiguous slots, as little per-step work as possible.

Decoding runs one token (or one small draft tree) per step, so its cost is the
weights read once per step plus per-op dispatch. This pass, separate from
`Transformer.forward` (which serves prefill and the blend), removes what it can:

- RoPE cos/sin come from a table built once, not recomputed per step;
- rotate-half is one flip and one fused multiply-add for q and k together;
- grouped-query attention folds each query group into the query rows, so K/V
  are never repeated (no copy of the whole cache per layer and step);
- on CPU, the linear layers run on the model's packed oneDNN weights (rag.model.linear),
  with bias-free SiLU / multiply / residual-add fused into the matmul: a pass of
  8 rows costs ~1.8x one row instead of ~3x.

Lookahead is lossless only if a token's logits are bitwise the same in a draft
tree and in the plain one-token loop. In bf16 they were not (ties in bf16 logits
are common, and 3 of 8 benchmark answers changed), for three reasons, each
handled here: a one-row matmul takes a matrix-vector path (a single token runs
as two identical rows, MIN_ROWS); SDPA's CPU kernel changes a row's last bits
with the row count and the key length; and a tree node's ancestors sit at other
slots than a plain step's, so the same terms are summed in another order
(`_attention` gathers each row's keys past the prompt into plain-step order).

K/V go straight into the preallocated `KVCache` rows; nothing grows per step.

On CPU `stepper_for` hands out the native step instead (rag.engine.native_step: the same pass as
one C call, 2.3-3.6x faster); this one serves CUDA and machines without a C compiler.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from rag.engine import native_step
from rag.engine.lookahead import tree_tails
from rag.engine.native_step import NativeDecodeStep
from rag.model.kv_cache import KVCache
from rag.model.transformer import Transformer, rope_cos_sin

MIN_ROWS = 2

_steppers: weakref.WeakKeyDictionary[Transformer, DecodeStep | NativeDecodeStep] = weakref.WeakKeyDictionary()


def stepper_for(model: Transformer) -> DecodeStep | NativeDecodeStep:
    """One step per model: the native one where it runs (on CPU with a C compiler,
    rag.engine.native_step), else this module's."""
    step = _steppers.get(model)
    if step is None:
        step = _steppers[model] = native_step.for_model(model) or DecodeStep(model)
    return step


class DecodeStep:
    # Lookahead's tree size for this step: verifying T rows costs 1 + (0.09 .. 0.14) (T - 1)
    # plain steps here (the step's overhead dwarfs a row's compute).
    draft_budget = 4

    def __init__(self, model: Transformer):
        a = model.args
        self.model = model
        self.args = a
        self.q_dim = a.n_heads * a.head_dim
        self.kv_dim = a.n_kv_heads * a.head_dim
        self.group = a.q_per_kv
        self.layers = []
        for layer in model.layers:
            self.layers.append((
                layer.attn_norm.weight.detach(),
                layer.wqkv.run,
                layer.wo.run,
                layer.mlp_norm.weight.detach(),
                layer.w_gate.run,
                layer.w_up.run,
                layer.w_down.run,
            ))
        self.norm_w = model.norm.weight.detach()
        self.lm_head = model.lm_head.run
        self.embed_w = model.embed.weight.detach()
        self._cos = self._sin = torch.empty(0)

    def _rope_table(self, n: int) -> None:
        """cos and sign-folded sin [n, 1, head_dim]: rope(x) = x*cos + flip_halves(x)*sin_signed."""
        m = self.model
        pos = torch.arange(n, device=m.device)
        cos, sin = rope_cos_sin(m.inv_freq, pos, self.args.rope_scale)
        half = self.args.head_dim // 2
        sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        self._cos = cos.to(m.dtype)[:, None, :]
        self._sin = sin.to(m.dtype)[:, None, :]

    @staticmethod
    def _tails(cache: KVCache, base: int, start: int, t: int, rows: int,
               mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Each row's keys past `base` in plain-step order (lookahead.tree_tails), padded to one
        width per generation (the buffer's free room), the padding masked out.

        Returns (slot indices [rows, width], or None where they are the contiguous slots
        base..max_len, as in a plain step; additive mask [rows, width])."""
        width = cache.max_len - base
        n = start - base
        if mask is None:  # causal over contiguous slots: row j sees base..start + j
            own = torch.arange(rows).clamp_(max=t - 1)
            hidden = torch.arange(width)[None, :] > (n + own)[:, None]
            return None, torch.zeros(rows, width).masked_fill_(hidden, float("-inf")).to(cache.k.device)
        tails, lengths = tree_tails(mask, base, start)
        rows_of = torch.arange(rows).clamp_(max=t - 1)  # a padded second row repeats the first
        idx = torch.full((rows, width), start, dtype=torch.long)
        idx[:, :tails.shape[1]] = tails[rows_of]
        hidden = torch.arange(width)[None, :] >= lengths[rows_of][:, None]
        add = torch.zeros(rows, width).masked_fill_(hidden, float("-inf"))
        return idx.to(cache.k.device), add.to(cache.k.device)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, cache: KVCache, start: int, *,
                 positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                 all_logits: bool = False, base: int | None = None) -> torch.Tensor:
        """Tokens `ids` [T] into slots start..start+T; logits float32 [T or 1, V].

        Positions default to the slots (a plain step); a draft tree passes its own
        (committed length + depth) and `mask` [T, start+T] (True = may attend).
        Without a mask each token sees every slot up to its own (causal). `base` is where
        this generation's prompt ends (default: `start`): see `_attention`.
        """
        base = start if base is None else base
        a = self.args
        t = ids.shape[0]
        end = start + t
        cache.ensure(end)
        if positions is None:
            if self._cos.shape[0] < end:
                self._rope_table(max(end, 2 * self._cos.shape[0], 256))
            cos, sin = self._cos[start:end], self._sin[start:end]
        else:
            need = int(positions.max()) + 1
            if self._cos.shape[0] < need:
                self._rope_table(max(need, 2 * self._cos.shape[0], 256))
            cos, sin = self._cos[positions], self._sin[positions]
        hd, kh, g, eps = a.head_dim, a.n_kv_heads, self.group, a.norm_eps
        nqk = a.n_heads + kh
        # A single token runs as two identical rows: with one row the CPU matmuls take a
        # matrix-vector path whose sums differ in the last bit from any batch of >= 2 rows,
        # which agree with each other. Costs little: a decode matmul is bound by its weights.
        rows = max(t, MIN_ROWS)
        if rows > t:
            ids, cos, sin = ids.expand(rows), cos.expand(rows, -1, -1), sin.expand(rows, -1, -1)
        tail_idx, tail_mask = self._tails(cache, base, start, t, rows, mask)
        scale = hd ** -0.5
        x = F.embedding(ids, self.embed_w)  # [rows, dim]
        ks, vs = cache.k, cache.v
        for i, (n1, wqkv, wo, n2, w_gate, w_up, w_down) in enumerate(self.layers):
            qkv = wqkv(F.rms_norm(x, (a.dim,), n1, eps))
            qk = qkv[:, :self.q_dim + self.kv_dim].view(rows, nqk, hd)
            rot = qk.view(rows, nqk, 2, hd // 2).flip(2).view(rows, nqk, hd)
            qk = torch.addcmul(qk * cos, rot, sin)
            v = qkv[:, self.q_dim + self.kv_dim:].view(rows, kh, hd)
            ks[i, 0, :, start:end] = qk[:t, a.n_heads:].transpose(0, 1)
            vs[i, 0, :, start:end] = v[:t].transpose(0, 1)
            # q [KH, rows, G, D]: a KV head's query group as rows, so K/V are never repeated.
            q = qk[:, :a.n_heads].view(rows, kh, g, hd).transpose(0, 1).float()
            attn = _attention(q, ks[i, 0], vs[i, 0], base, tail_idx, tail_mask, scale)
            x = wo(attn.transpose(0, 1).reshape(rows, self.q_dim).to(x.dtype), "add", x)
            h = F.rms_norm(x, (a.dim,), n2, eps)
            x = w_down(w_up(h, "mul", w_gate(h, "swish")), "add", x)
        cache.length = max(cache.length, end)
        logits = self.lm_head(F.rms_norm(x, (a.dim,), self.norm_w, eps))
        return (logits[:t] if all_logits else logits[t - 1:t]).float()


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, base: int, tail_idx: torch.Tensor | None,
               tail_mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Float32 attention of q [KH, R, G, D] over the prompt slots [0, base) of k, v [KH, S, D]
    and each row's own tail of slots `tail_idx` [R, W] (None: slots base.. for every row);
    returns [KH, R, G, D].

    Laid out so that a token's result is bitwise the same whether it runs alone, as one row of
    a draft tree, on the tree's first branch or another: the prompt part is one matmul whose rows
    do not depend on each other (measured, for >= 2 tokens), and the tail is gathered into the
    order a plain step would see it (a plain step's slots are contiguous, a tree node's
    ancestors are not: summed in another order, the same terms round differently). SDPA's CPU
    kernel, by contrast, changes a row's last bits with the row count and the key layout.
    """
    kh, r, g, d = q.shape
    if tail_idx is None:  # the same contiguous tail for each row, laid out as a gathered one would be
        w = tail_mask.shape[1]
        kt = k[:, None, base:base + w].expand(kh, r, w, d).float().contiguous()
        vt = v[:, None, base:base + w].expand(kh, r, w, d).float().contiguous()
    else:
        kt, vt = k[:, tail_idx].float(), v[:, tail_idx].float()  # [KH, R, W, D]
    tail = torch.matmul(q, kt.transpose(2, 3)) * scale + tail_mask[None, :, None, :]
    if base == 0:
        return torch.matmul(tail.softmax(-1), vt)
    kp, vp = k[:, :base].float(), v[:, :base].float()
    head = (torch.matmul(q.reshape(kh, r * g, d), kp.transpose(1, 2)) * scale).view(kh, r, g, base)
    p = torch.cat([head, tail], dim=-1).softmax(-1)
    out = torch.matmul(p[..., :base].reshape(kh, r * g, base), vp).view(kh, r, g, d)
    return out + torch.matmul(p[..., base:], vt)
