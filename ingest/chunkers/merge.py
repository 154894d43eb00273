"""Dynamic merging: sentences and meta-chunks into chunks of a target size, never over a hard max.

Sizes are embedder wordpieces, counted once per text (one tokenizer pass) and
then per span by bisecting the wordpiece offsets: wordpieces never cross
whitespace, so a span's count is the sum of its sentences' counts.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence

from ingest.chunkers.base import Span, strip_span
from rag.index.embedder import MAX_WORDPIECES


class TokenCounter:
    """Wordpiece counts of spans of one text."""

    def __init__(self, tokenizer, text: str):
        enc = tokenizer(
            text,
            add_special_tokens=False,
            return_offsets_mapping=True,
            truncation=False,
            verbose=False,
        )
        self.text = text
        self.offsets = [tuple(o) for o in enc["offset_mapping"]]
        self.starts = [s for s, _ in self.offsets]

    def __len__(self) -> int:
        return len(self.offsets)

    def count(self, start: int, end: int) -> int:
        return bisect_left(self.starts, end) - bisect_left(self.starts, start)

    def cut(self, start: int, end: int, max_tokens: int) -> list[Span]:
        """Split a span into balanced pieces of at most `max_tokens` wordpieces (at wordpiece
        starts)."""
        first, last = bisect_left(self.starts, start), bisect_left(self.starts, end)
        n = last - first
        if n <= max_tokens:
            return [(start, end)]
        pieces = -(-n // max_tokens)
        cuts = [first + (n * i) // pieces for i in range(1, pieces)]
        bounds = [start] + [self.starts[c] for c in cuts] + [end]
        out = [strip_span(self.text, a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
        return [s for s in out if s[1] > s[0]]


# Gap strengths: line breaks and blank lines outrank anything a model says, which then orders
# the gaps inside a paragraph: packing across structure costs recall at the same chunk size
# (eval/RESULTS_retrieval.md).
LINE_BREAK = 10.0
BLANK_LINE = 20.0
# What a cut costs before its gap's strength is taken off: above every strength, so chunks are
# as few as the target allows unless an extra cut lands on a paragraph break. On Chroma's
# corpora (eval/RESULTS_retrieval.md) 25-35 beat recursive splitting on recall and IoU at once
# at sizes 150 and 200; the greedy weakest-gap-first merge this replaced left chunks at ~73 %
# of the target and lost ~1 point of recall to it.
CUT_COST = 30.0
# A meta-chunk end whose signal stands this many standard deviations above the text's mean is a
# change of topic (two documents side by side): always cut there. It costs no recall on Chroma's
# corpora and gains IoU (0.1-0.2 points); without it the fill won over such seams.
SHIFT_SD = 2.5


def boundary_strengths(
    text: str,
    sentences: Sequence[Span],
    boundaries: Sequence[int],
    strength: Sequence[float] | None,
) -> list[float]:
    """How much to keep each gap (after sentence i): structure, then meta-chunk ends, then the
    signal
    (standardized over the text); a topic shift outranks all."""
    n = len(sentences)
    sig = list(strength[: n - 1]) if strength is not None else [0.0] * (n - 1)
    mean = sum(sig) / max(1, len(sig))
    sd = (sum((x - mean) ** 2 for x in sig) / max(1, len(sig))) ** 0.5 or 1.0
    ends = set(boundaries)
    out = []
    for i in range(n - 1):
        gap = text[sentences[i][1] : sentences[i + 1][0]].count("\n")
        structure = BLANK_LINE if gap >= 2 else LINE_BREAK if gap == 1 else 0.0
        z = (sig[i] - mean) / sd
        shift = CUT_COST if i in ends and z >= SHIFT_SD else 0.0  # a topic shift: its cut is free
        out.append(structure + (1.0 if i in ends else 0.0) + 0.5 * z + shift)
    return out


def merge_meta_chunks(
    text: str,
    sentences: Sequence[Span],
    boundaries: Sequence[int],
    counter: TokenCounter,
    target: int,
    max_tokens: int = MAX_WORDPIECES,
    strength: Sequence[float] | None = None,
) -> list[Span]:
    """Sentences -> chunks of at most `target` wordpieces, cut where the gaps are strongest.

    `boundaries` are the meta-chunk ends (sentence indices) and `strength[i]` the
    chunker's score for a split after sentence i (higher = keep apart). The cuts are
    chosen together, by dynamic programming over the sentences: each costs CUT_COST
    minus its gap's strength (`boundary_strengths`), and the cheapest set whose chunks
    all fit the target wins. A sentence over the target is a chunk alone, and cut into
    wordpiece windows if it is over the hard max.
    """
    n = len(sentences)
    if n == 0:
        return []
    max_tokens = min(max_tokens, MAX_WORDPIECES)
    target = min(target, max_tokens)
    sizes = [counter.count(s, e) for s, e in sentences]
    cut_cost = [CUT_COST - g for g in boundary_strengths(text, sentences, boundaries, strength)] + [
        0.0
    ]
    # cost[j]: the cheapest cutting of sentences [0, j) into chunks that fit; first[j]: where its
    # last chunk starts.
    cost = [0.0] + [math.inf] * n
    first = [0] * (n + 1)
    for j in range(1, n + 1):
        total = 0
        for i in range(j - 1, -1, -1):
            total += sizes[i]
            if total > target and i < j - 1:
                break
            if cost[i] + cut_cost[j - 1] < cost[j]:
                cost[j], first[j] = cost[i] + cut_cost[j - 1], i
    pieces = []
    j = n
    while j:
        pieces.append((first[j], j))
        j = first[j]
    out: list[Span] = []
    for i, j in reversed(pieces):
        if j - i == 1 and sizes[i] > max_tokens:
            out += counter.cut(*sentences[i], max_tokens)
        else:
            out.append((sentences[i][0], sentences[j - 1][1]))
    return out
