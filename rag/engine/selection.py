"""Which reused tokens the blend recomputes: those the question reads most.

A pass of the question alone over the stitched cache (the model's own forward, with an
attention that also records its weights) measures how much attention each context token gets
in every layer. A token recomputed from layer l on changes what the question reads in layers
>= l, so tokens are ranked by the attention they get summed over those layers. The selection
is applied by `Selector`, a hook on the forward that keeps the chosen tokens at the check
layers.

CacheBlend's own rule ranks tokens by how far their K/V move at an early check layer; it
measured worse (eval/RESULTS_ttft.md) and is not kept.
"""

from __future__ import annotations

import math
import time

import torch

from rag.engine.prompt import Prompt
from rag.model.context import Context
from rag.model.kv_cache import KVCache
from rag.model.transformer import Transformer


class AttentionProbe:
    """Attends like the model but explicitly (SDPA does not return the weights), over slots
    [0, end) where only the context slots marked `visible` hold K/V, causal among the question
    tokens at [start, end); records the attention each slot gets (mean over heads and query
    tokens) in every layer."""

    def __init__(self, model: Transformer, start: int, end: int, visible: torch.Tensor):
        a = model.args
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.start, self.end = start, end
        t = end - start
        self.unseen = (~visible).nonzero().squeeze(1)  # context slots without K/V
        self.later = torch.ones(t, t, dtype=torch.bool, device=model.device).triu(1)
        self.mass: list[torch.Tensor] = []

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        kh, t, d = self.n_kv_heads, self.end - self.start, self.head_dim
        rep = self.n_heads // kh
        # The query heads that share a KV head as the rows of one matrix: K is never copied
        # per head. In the model's dtype: softmax computes in float32 inside, and a ranking
        # needs no more.
        qg = q.reshape(kh, rep * t, d) * d**-0.5
        s = torch.bmm(qg, k[0, :, : self.end].transpose(-1, -2))
        s[..., self.start :].view(kh, rep, t, t).masked_fill_(self.later, float("-inf"))
        if len(self.unseen):
            s[..., self.unseen] = float("-inf")
        p = s.softmax(-1)
        self.mass.append(p.sum(1).float().sum(0) / (self.n_heads * t))
        return (p @ v[0, :, : self.end]).view(1, self.n_heads, t, d)

    def rows(self, keep: torch.Tensor | slice, slots: torch.Tensor) -> AttentionProbe:
        raise NotImplementedError("the question pass computes every question token")


def question_attention(
    model: Transformer, cache: KVCache, prompt: Prompt, visible: torch.Tensor
) -> torch.Tensor:
    """[n_layers, len(prompt)]: the attention each slot gets from the question tokens in each
    layer, running the question alone over `cache`, where only the context slots marked
    `visible` [context_end] hold K/V.

    Writes the question's K/V into its slots (the blend overwrites them).
    """
    start, end = prompt.context_end, len(prompt)
    probe = AttentionProbe(model, start, end, visible)
    positions = torch.arange(start, end, device=model.device)
    cos, sin = model.rope(positions)
    ctx = Context(cache, positions, slice(start, end), cos, sin, probe)
    model.run(torch.tensor([prompt.footer], device=model.device), ctx)
    return torch.stack(probe.mass)


def keep_counts(ratio: float, n_reused: int, n_checks: int) -> list[int]:
    """Reused tokens kept after each check layer; gradual filtering shrinks linearly to the
    target."""
    target = math.ceil(ratio * n_reused)
    return [min(n_reused, math.ceil(target * (n_checks - j))) for j in range(n_checks)]


class Selector:
    """The forward's hook: before each check layer, keep the forced tokens (question, uncached
    chunks) and the reused ones that score best for the layers from there on. Tracks which
    tokens are computed, and each layer's token count and wall time."""

    def __init__(
        self,
        score: torch.Tensor,
        forced: torch.Tensor,
        checks: dict[int, int],
        active: torch.Tensor,
    ):
        self.score = score  # [n_layers, n]: a token's value if recomputed from that layer on
        self.forced = forced  # [n] bool
        self.checks = checks  # layer -> reused tokens kept from it on
        self.active = active  # indices into the n tokens, in order
        self.layer_tokens: list[int] = []
        self.marks: list[float] = []

    def __call__(self, layer: int, x: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, Context]:
        self.marks.append(time.perf_counter())
        if layer in self.checks:
            keep = top(self.score[layer, self.active], self.forced[self.active], self.checks[layer])
            self.active = self.active[keep]
            x, ctx = x[:, keep], ctx.rows(keep)
        self.layer_tokens.append(len(self.active))
        return x, ctx

    def layer_ms(self) -> list[float]:
        """Each layer's wall time, once the forward has returned."""
        marks = [*self.marks, time.perf_counter()]
        return [1000 * (b - a) for a, b in zip(marks, marks[1:], strict=False)]


def top(score: torch.Tensor, forced: torch.Tensor, n_reused: int) -> torch.Tensor:
    """Indices (in order) of the forced tokens plus the n_reused best-scoring others."""
    n_keep = min(len(score), int(forced.sum()) + n_reused)
    return score.masked_fill(forced, float("inf")).topk(n_keep).indices.sort().values
