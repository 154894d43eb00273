"""Boundary clarity (MoC, Zhao et al. 2025): how little a chunk helps the LLM predict the next one.

For adjacent chunks (a, b): loss(b | a) / loss(b | nothing), the mean token loss
of b after a over its loss alone (after a single space, as MoC's code does).
Near 1: a says little about b, a clean boundary; well below 1: the boundary cut
through one piece of text. Label-free, so it works on any corpus.
"""

from __future__ import annotations

from collections.abc import Sequence

from ingest.chunkers.base import Span


def sample_pairs(chunks: dict[str, Sequence[Span]], n: int) -> list[tuple[str, Span, Span]]:
    """Up to n adjacent (previous, next) chunk pairs, spread evenly over all corpora in order."""
    pairs = [
        (corpus, a, b)
        for corpus, spans in chunks.items()
        for a, b in zip(spans, spans[1:], strict=False)
    ]
    if n <= 0 or not pairs:
        return []
    if len(pairs) <= n:
        return pairs
    return [pairs[(i * len(pairs)) // n] for i in range(n)]


def boundary_clarity(
    texts: dict[str, str], pairs: Sequence[tuple[str, Span, Span]], scorer, max_tokens: int = 128
) -> float | None:
    """Mean of loss(next | previous) / loss(next alone) over the pairs (texts truncated to
    max_tokens)."""
    tok = scorer.tokenizer
    space = tok.encode_text(" ")
    ratios = []
    for corpus, (a0, a1), (b0, b1) in pairs:
        text = texts[corpus]
        prev = tok.encode_text(text[a0:a1])[-max_tokens:]
        nxt = tok.encode_text(text[b0:b1])[:max_tokens]
        if not prev or not nxt:
            continue
        alone = scorer.continuation_loss(space, nxt)
        if alone > 0:
            ratios.append(scorer.continuation_loss(prev, nxt) / alone)
    return sum(ratios) / len(ratios) if ratios else None
