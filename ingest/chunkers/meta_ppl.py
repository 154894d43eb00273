"""Meta-Chunking by perplexity: boundaries after sentences whose perplexity is a local minimum.

Each sentence's perplexity is the mean loss of its tokens given all the text
before it in the scoring window (ingest.lm_scorer). A sentence the LLM finds
easy right after one it found hard, followed by a hard one again, closes a
stretch of related text: Meta-Chunking (Zhao et al., 2024) ends a meta-chunk
there. Meta-chunks are then merged to the target size (ingest.chunkers.merge).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence

from ingest.chunkers.base import Span
from ingest.chunkers.merge import TokenCounter, merge_meta_chunks
from ingest.sentences import SentenceSplitter, split_sentences
from rag.index.embedder import MAX_WORDPIECES


def find_minima(values: Sequence[float], threshold: float = 0.0) -> list[int]:
    """Indices i with values[i] below both neighbours and a drop of at least `threshold` on
    one side.

    A plateau to the right (values[i] == values[i+1]) counts when the drop on the
    left is large enough, as in the reference implementation.
    """
    out = []
    for i in range(1, len(values) - 1):
        prev, cur, nxt = values[i - 1], values[i], values[i + 1]
        if cur < prev and cur < nxt:
            if prev - cur >= threshold or nxt - cur >= threshold:
                out.append(i)
        elif cur < prev and cur == nxt and prev - cur >= threshold:
            out.append(i)
    return out


def sentence_perplexities(text: str, sentences: Sequence[Span], scorer) -> list[float]:
    """Mean token loss of each sentence given the preceding text in its window (NaN-free)."""
    ids, offsets = scorer.tokenizer.encode_with_offsets(text)
    losses = scorer.token_losses(ids).tolist()
    starts = [s for s, _ in sentences]
    sums = [0.0] * len(sentences)
    counts = [0] * len(sentences)
    for loss, (a, b) in zip(losses, offsets, strict=True):
        if math.isnan(loss) or not text[a:b].strip():
            continue  # the first token, and whitespace-only tokens between sentences
        last = b - 1
        while last > a and text[last].isspace():
            last -= 1
        i = bisect_right(starts, last) - 1
        if i >= 0 and sentences[i][0] <= last < sentences[i][1]:
            sums[i] += loss
            counts[i] += 1
    mean = [s / c if c else math.nan for s, c in zip(sums, counts, strict=True)]
    # A sentence without a scored token (the very first one, one-token) takes its neighbour's value.
    fill = next((v for v in mean if not math.isnan(v)), 0.0)
    for i, v in enumerate(mean):
        if math.isnan(v):
            mean[i] = fill
        else:
            fill = v
    return mean


class PerplexityChunker:
    name = "meta-ppl"

    def __init__(
        self,
        scorer,
        counter_tokenizer,
        size: int = 200,
        threshold: float = 0.0,
        max_tokens: int = MAX_WORDPIECES,
        splitter: SentenceSplitter | None = None,
    ):
        self.scorer = scorer
        self.counter_tokenizer = counter_tokenizer  # the embedder's: sizes are its wordpieces
        self.size = size
        self.threshold = threshold
        self.max_tokens = max_tokens
        self.splitter = splitter

    def boundaries(self, text: str, sentences: Sequence[Span]) -> tuple[list[int], list[float]]:
        """Sentence indices that end a meta-chunk, and a split strength for every sentence gap."""
        ppl = sentence_perplexities(text, sentences, self.scorer)
        minima = find_minima(ppl, self.threshold)
        # Inside an oversized meta-chunk, split where the perplexity jumps up the most.
        strength = [ppl[i + 1] - ppl[i] for i in range(len(ppl) - 1)] + [0.0]
        return minima, strength

    def split(self, text: str) -> list[Span]:
        sentences = split_sentences(text, self.splitter)
        if not sentences:
            return []
        minima, strength = self.boundaries(text, sentences)
        counter = TokenCounter(self.counter_tokenizer, text)
        return merge_meta_chunks(
            text, sentences, minima, counter, self.size, self.max_tokens, strength
        )
