"""A decode step on the model's own forward: one token, or a Lookahead draft tree, per call.

Lookahead is lossless only if a token's logits are bitwise the same in a draft tree and in
the plain one-token loop. This step guarantees it with three rules:

- a single token runs as two identical rows: with one row the CPU matmuls take a
  matrix-vector path whose sums differ in the last bit from any batch of >= 2 rows, which
  agree with each other (a decode matmul is bound by its weights, so the row costs little);
- attention is float32 and laid out so that a row's result does not depend on the other rows
  (SDPA's CPU kernel changes a row's last bits with the row count and the key layout);
- a tree node's keys past the prompt are gathered into the order a plain step reads them
  (its ancestors sit at other slots; summed in another order, the same terms round
  differently).

On CPU the engine runs the native step instead (rag.engine.native_step: the same pass as one C
call, held to this one by tests); this one serves CUDA and machines without a C compiler.
"""

from __future__ import annotations

import torch

from rag.engine.batch_row import BatchRow
from rag.engine.lookahead import tree_tails
from rag.model.context import Context
from rag.model.kv_cache import KVCache
from rag.model.layers import rope_cos_sin
from rag.model.transformer import Transformer

MIN_ROWS = 2


class DecodeAttention:
    """Float32 attention of each row over the prompt slots [0, base) and its own tail of slots
    (see `attend_rows`)."""

    def __init__(
        self, base: int, tail_idx: torch.Tensor | None, tail_mask: torch.Tensor, n_kv_heads: int
    ):
        self.base, self.tail_idx, self.tail_mask, self.n_kv_heads = (
            base,
            tail_idx,
            tail_mask,
            n_kv_heads,
        )

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        _, h, r, d = q.shape
        kh = self.n_kv_heads
        # [KH, R, G, D]: a KV head's query group as rows, so K/V are never repeated.
        rows = q[0].view(kh, h // kh, r, d).transpose(1, 2).float()
        out = attend_rows(rows, k[0], v[0], self.base, self.tail_idx, self.tail_mask, d**-0.5)
        return out.transpose(1, 2).reshape(1, h, r, d).to(q.dtype)

    def rows(self, keep: torch.Tensor | slice, slots: torch.Tensor) -> DecodeAttention:
        raise NotImplementedError("a decode step computes every row")


class DecodeStep:
    # Lookahead's tree size for this step: a decode step's cost is mostly per-op overhead, so
    # extra rows are cheap.
    draft_budget = 4

    def __init__(self, model: Transformer):
        self.model = model
        self._cos = self._sin = torch.empty(0)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the positions from a table built once (not recomputed per step)."""
        need = int(positions.max()) + 1
        if self._cos.shape[0] < need:
            m = self.model
            n = max(need, 2 * self._cos.shape[0], 256)
            cos, sin = rope_cos_sin(m.inv_freq, torch.arange(n, device=m.device), m.args.rope_scale)
            self._cos, self._sin = cos.to(m.dtype), sin.to(m.dtype)
        return self._cos[positions], self._sin[positions]

    @staticmethod
    def _tails(
        cache: KVCache, base: int, start: int, t: int, rows: int, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Each row's keys past `base` in plain-step order (lookahead.tree_tails), padded to one
        width per generation (the buffer's free room), the padding masked out.

        Returns (slot indices [rows, width], or None where they are the contiguous slots
        base..max_len, as in a plain step; additive mask [rows, width])."""
        width = cache.max_len - base
        n = start - base
        own = torch.arange(rows).clamp_(max=t - 1)  # a padded second row repeats the first
        if mask is None:  # causal over contiguous slots: row j sees base..start + j
            hidden = torch.arange(width)[None, :] > (n + own)[:, None]
            add = torch.zeros(rows, width).masked_fill_(hidden, float("-inf"))
            return None, add.to(cache.k.device)
        tails, lengths = tree_tails(mask, base, start)
        idx = torch.full((rows, width), start, dtype=torch.long)
        idx[:, : tails.shape[1]] = tails[own]
        hidden = torch.arange(width)[None, :] >= lengths[own][:, None]
        add = torch.zeros(rows, width).masked_fill_(hidden, float("-inf"))
        return idx.to(cache.k.device), add.to(cache.k.device)

    @torch.inference_mode()
    def __call__(
        self,
        ids: torch.Tensor,
        cache: KVCache,
        start: int,
        *,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        all_logits: bool = False,
        base: int | None = None,
    ) -> torch.Tensor:
        """Tokens `ids` [T] into slots start..start+T; logits float32 [T or 1, V].

        Positions default to the slots (a plain step); a draft tree passes its own
        (committed length + depth) and `mask` [T, start+T] (True = may attend).
        Without a mask each token sees every slot up to its own (causal). `base` is where
        this generation's prompt ends (default: `start`): keys past it are read per row.
        """
        model = self.model
        base = start if base is None else base
        t = ids.shape[0]
        cache.ensure(start + t)
        if positions is None:
            positions = torch.arange(start, start + t, device=model.device)
        slots = torch.arange(start, start + t, device=model.device)
        rows = max(t, MIN_ROWS)
        if rows > t:  # a padded row repeats the token, and writes the same K/V to its slot
            ids, positions, slots = ids.expand(rows), positions.expand(rows), slots.expand(rows)
        tail_idx, tail_mask = self._tails(cache, base, start, t, rows, mask)
        cos, sin = self._rope(positions)
        attention = DecodeAttention(base, tail_idx, tail_mask, model.args.n_kv_heads)
        ctx = Context(cache, positions, slots, cos, sin, attention)
        logits = model.logits(model.run(ids[None], ctx)[0])
        return logits[:t] if all_logits else logits[t - 1 : t]

    def batch(self, rows: list[BatchRow]) -> torch.Tensor:
        return decode_batch(self, rows)


class BatchContext:
    """The Context of a batched decode step: row i is one token of request i, whose K/V go to
    and are read from that request's own buffer. Each row attends exactly as its request's
    plain step (`DecodeStep.__call__`) does, as two identical rows, so its bits do not depend
    on the batch."""

    def __init__(self, rows: list[BatchRow], cos: torch.Tensor, sin: torch.Tensor, kh: int):
        self.batch_rows, self.cos, self.sin = rows, cos, sin
        self.attention = [
            DecodeAttention(
                r.base, *DecodeStep._tails(r.cache, r.base, r.pos, 1, MIN_ROWS, None), kh
            )
            for r in rows
        ]
        self.end = 0  # (no shared buffer: each row's is its own)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for i, r in enumerate(self.batch_rows):
            r.cache.write(layer, slice(r.pos, r.pos + 1), k[:, :, i : i + 1], v[:, :, i : i + 1])

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q[:, :, : len(self.batch_rows)])
        for i, (r, attention) in enumerate(zip(self.batch_rows, self.attention, strict=True)):
            qi = q[:, :, i : i + 1].expand(-1, -1, MIN_ROWS, -1)
            out[:, :, i] = attention(layer, qi, r.cache.k[layer], r.cache.v[layer])[:, :, 0]
        return out

    def finish(self, end: int) -> None:
        for r in self.batch_rows:
            r.cache.length = max(r.cache.length, r.pos + 1)


def decode_batch(step: DecodeStep, rows: list[BatchRow]) -> torch.Tensor:
    """One token for each of several requests in one forward over the weights (the PyTorch
    counterpart of NativeDecodeStep.batch): logits float32 [len(rows), V]."""
    model = step.model
    n = len(rows)
    padded = rows if n >= MIN_ROWS else rows * MIN_ROWS  # one row alone: two (see module doc)
    for r in rows:
        r.cache.ensure(r.pos + 1)
    ids = torch.tensor([[r.token for r in padded]], device=model.device)
    positions = torch.tensor([r.pos for r in padded], device=model.device)
    cos, sin = step._rope(positions)
    ctx = BatchContext(padded, cos, sin, model.args.n_kv_heads)
    return model.logits(model.run(ids, ctx)[0])[:n]  # type: ignore[arg-type]


def attend_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    base: int,
    tail_idx: torch.Tensor | None,
    tail_mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Float32 attention of q [KH, R, G, D] over the prompt slots [0, base) of k, v [KH, S, D]
    and each row's own tail of slots `tail_idx` [R, W] (None: slots base.. for every row);
    returns [KH, R, G, D].

    The prompt part is one matmul whose rows do not depend on each other (for >= 2 rows), and
    each tail is gathered in plain-step order, so a token's result is bitwise the same alone,
    as one row of a draft tree, on the tree's first branch or another.
    """
    kh, r, g, d = q.shape
    if tail_idx is None:  # the same contiguous tail for each row, laid out as a gathered one
        w = tail_mask.shape[1]
        kt = k[:, None, base : base + w].expand(kh, r, w, d).float().contiguous()
        vt = v[:, None, base : base + w].expand(kh, r, w, d).float().contiguous()
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
