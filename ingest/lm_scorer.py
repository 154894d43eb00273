"""The LLM as a scorer: per-token losses over long texts, and next-token probabilities.

Chunking only reads losses and probabilities, never generates. The scorer runs
in the engine's dtype (`auto`: bf16 where the hardware does bf16 natively, else
float32). The runtimes and quantizations weighed against it are in
eval/RESULTS_retrieval.md.

Long texts are scored with a sliding window that is recomputed from scratch for
every window (a rotated KV cache is never trimmed, which would leave keys at
the wrong positions).
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Sequence

import torch


def _cut_candidates(ids: Sequence[int]) -> list[int]:
    """Content-defined cut points (~1 in 64 positions): the same text yields the same cuts
    wherever it is."""
    out = []
    for i in range(3, len(ids)):
        h = (ids[i - 3] * 2654435761 + ids[i - 2] * 40503 + ids[i - 1] * 97 + ids[i]) % 1000003
        if h % 64 == 0:
            out.append(i)
    return out


def plan_windows(ids: Sequence[int], window: int, context: int) -> list[tuple[int, int, int]]:
    """Windows (start, end, keep_from): each reports the losses of tokens [keep_from, end).

    Every token but the first is scored with at least `context` tokens (or all the
    text, if fewer) before it. Reported ranges end at content-defined cut points,
    so a passage repeated in a document (finance reports repeat whole sections)
    produces identical windows that are scored once.
    """
    if not 0 <= context < window:
        raise ValueError(f"need 0 <= context < window, got {context=} {window=}")
    n, step = len(ids), window - context
    cuts = _cut_candidates(ids)
    out = []
    keep = 1  # token 0 has nothing to be predicted from
    while keep < n:
        if keep + step >= n:
            end = n
        else:
            j = bisect_right(cuts, keep + step) - 1
            end = cuts[j] if j >= 0 and cuts[j] >= keep + step // 2 else keep + step
        out.append((max(0, keep - context), end, keep))
        keep = end
    return out


def _digest(*parts: object) -> bytes:
    """A content key for token ids (nested sequences allowed)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"|")
    return h.digest()


class LMScorer:
    """Loss and answer-probability queries against one causal LM
    (rag.model.transformer.Transformer)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        window: int = 512,
        context: int = 64,
        batch_tokens: int = 1024,
        memo_values: int = 1 << 22,
    ):
        self.model = model
        self.tokenizer = tokenizer  # rag.model.tokenizer.ChatTokenizer
        self.window = window
        self.context = context
        self.batch_tokens = batch_tokens
        # Answers by content for the latest texts (up to `memo_values` floats, 16 MB): a chunker's
        # LLM signal does not depend on the chunk size, so a size sweep asks once per text.
        self.memo: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.memo_values = memo_values
        self.memo_hits = 0

    def _recall(self, key: bytes) -> torch.Tensor | None:
        found = self.memo.get(key)
        if found is not None:
            self.memo.move_to_end(key)
            self.memo_hits += 1
            return found.clone()
        return None

    def _remember(self, key: bytes, value: torch.Tensor) -> torch.Tensor:
        self.memo[key] = value.clone()
        while sum(v.numel() for v in self.memo.values()) > self.memo_values:
            self.memo.popitem(last=False)
        return value

    @classmethod
    def load(cls, settings, **kw) -> LMScorer:
        """A scoring copy of the configured model, in the configured dtype (auto: see above)."""
        from rag.model.loader import load_transformer, resolve_model_dir
        from rag.model.tokenizer import ChatTokenizer

        path = resolve_model_dir(settings.model, settings.models_dir)
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[settings.torch_dtype]
        return cls(load_transformer(path, dtype, settings.torch_device), ChatTokenizer(path), **kw)

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    # -- per-token losses ---------------------------------------------------------
    def token_losses(self, ids: Sequence[int]) -> torch.Tensor:
        """Cross-entropy of each token given the text before it (in its window): float32 [n].

        Entry 0 is NaN (nothing predicts the first token). Windows are batched with
        right padding, which a causal model never attends to.
        """
        ids = list(ids)
        key = _digest("losses", (self.window, self.context, self.batch_tokens), ids)
        if (found := self._recall(key)) is not None:
            return found
        return self._remember(key, self._token_losses(ids))

    def _token_losses(self, ids: list[int]) -> torch.Tensor:
        n = len(ids)
        out = torch.full((n,), float("nan"))
        if n < 2:
            return out
        todo: dict[tuple[int, ...], list[tuple[int, int, int]]] = {}
        for s, e, keep in plan_windows(ids, self.window, self.context):
            todo.setdefault(tuple(ids[s:e]), []).append((s, e, keep))
        windows = sorted(todo, key=len)
        b = 0
        while b < len(windows):
            # As many windows as fit the token budget; padded to the longest of them.
            rows = [windows[b]]
            while (
                b + len(rows) < len(windows)
                and len(windows[b + len(rows)]) * (len(rows) + 1) <= self.batch_tokens
            ):
                rows.append(windows[b + len(rows)])
            b += len(rows)
            width = len(rows[-1])
            batch = torch.zeros((len(rows), width), dtype=torch.long)
            for r, w in enumerate(rows):
                batch[r, : len(w)] = torch.as_tensor(w)
            cache = self.model.new_cache(width, batch=len(rows))
            hidden = self.model(batch.to(self.device), cache, start=0, logits_for=None)
            # The lm_head only for the rows whose losses are kept, not for a window's leading
            # context or its padding: rows first..len(w)-2 of window w (row j predicts token j + 1).
            firsts = [min(keep - s for s, _, keep in todo[w]) - 1 for w in rows]
            picked = torch.cat(
                [
                    torch.arange(r * width + first, r * width + len(w) - 1)
                    for r, (first, w) in enumerate(zip(firsts, rows, strict=True))
                ]
            )
            losses = self.model.token_losses(
                hidden.flatten(0, 1)[picked.to(hidden.device)],
                batch.flatten()[picked + 1].to(hidden.device),
            ).cpu()
            at = 0  # losses[at + j - first] is the loss of token s + j + 1
            for first, w in zip(firsts, rows, strict=True):
                for s, e, keep in todo[w]:
                    out[keep:e] = losses[at + keep - s - 1 - first : at + e - s - 1 - first]
                at += len(w) - 1 - first
        return out

    # -- answers after a fixed prefix ------------------------------------------
    def prefix_cache(self, prefix_ids: Sequence[int], batch: int, extra: int):
        """A KV buffer of `batch` rows, each holding the prefix's K/V, room for `extra` more
        tokens."""
        p = len(prefix_ids)
        one = self.model.new_cache(p, batch=1)
        self.model(
            torch.as_tensor([list(prefix_ids)], device=self.device), one, start=0, logits_for=None
        )
        cache = self.model.new_cache(p + extra, batch=batch)
        cache.k[:, :, :, :p] = one.k[:, :1, :, :p]
        cache.v[:, :, :, :p] = one.v[:, :1, :, :p]
        cache.length = p
        return cache

    def next_token_probs(
        self,
        prefix_ids: Sequence[int],
        suffixes: Sequence[Sequence[int]],
        answer_ids: Sequence[int],
        batch: int = 16,
    ) -> torch.Tensor:
        """P(answer | prefix + suffix) for each suffix and answer token:
        float32 [n, len(answer_ids)].

        The prefix is prefilled once; each batch of suffixes (right-padded, which a
        causal model never attends to) is written after it in the same buffer.
        """
        key = _digest("probs", prefix_ids, suffixes, answer_ids)
        if (found := self._recall(key)) is not None:
            return found
        return self._remember(key, self._next_token_probs(prefix_ids, suffixes, answer_ids, batch))

    def _next_token_probs(
        self,
        prefix_ids: Sequence[int],
        suffixes: Sequence[Sequence[int]],
        answer_ids: Sequence[int],
        batch: int,
    ) -> torch.Tensor:
        out = torch.zeros((len(suffixes), len(answer_ids)))
        if not suffixes:
            return out
        p = len(prefix_ids)
        order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
        longest = max(len(s) for s in suffixes)
        cache = self.prefix_cache(prefix_ids, min(batch, len(suffixes)), longest)
        answers = torch.as_tensor(list(answer_ids))
        pad = int(answer_ids[0])
        for b in range(0, len(order), batch):
            rows = order[b : b + batch]
            if len(rows) != cache.k.shape[1]:
                cache = self.prefix_cache(prefix_ids, len(rows), longest)
            width = max(len(suffixes[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : len(suffixes[i])] = torch.as_tensor(list(suffixes[i]))
            last = torch.as_tensor([len(suffixes[i]) - 1 for i in rows])
            needed = torch.unique(last)  # logits only where some row ends
            cache.length = p
            logits = self.model(
                ids.to(self.device), cache, start=p, logits_for=needed.to(self.device)
            )
            col = torch.searchsorted(needed, last)
            picked = logits.cpu()[torch.arange(len(rows)), col]  # [rows, V]
            probs = torch.softmax(picked.float(), dim=-1)[:, answers]
            out[torch.as_tensor(rows)] = probs
        return out

    # -- losses of one text after another -------------------------------------
    def continuation_loss(self, context_ids: Sequence[int], ids: Sequence[int]) -> float:
        """Mean loss of `ids` following `context_ids` (both non-empty)."""
        full = torch.as_tensor([list(context_ids) + list(ids)], device=self.device)
        cache = self.model.new_cache(full.shape[1])
        c = len(context_ids)
        hidden = self.model(full, cache, start=0, logits_for=None)
        return float(self.model.token_losses(hidden[0, c - 1 : -1], full[0, c:]).mean())
