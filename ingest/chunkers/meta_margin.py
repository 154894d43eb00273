"""Meta-Chunking by margin sampling: the LLM is asked, for each sentence, whether it
starts a new chunk.

The margin is P("2": keep together) - P("1": split) for the next answer token. As
in Meta-Chunking, the sentence joins the current chunk when the margin exceeds
an adaptive threshold, the mean of the last five margins, which absorbs a small
model's bias towards either answer. The fixed instruction is prefilled once and
its KV reused for every question; each question carries only the tail of the
current chunk and the head of the next sentence, so it stays a few dozen tokens.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from ingest.chunkers.base import Span
from ingest.chunkers.merge import TokenCounter, merge_meta_chunks
from ingest.sentences import SentenceSplitter, split_sentences
from rag.index.embedder import MAX_WORDPIECES

SYSTEM = "You are a helpful assistant."
INSTRUCTION = (
    "This is a text chunking task. Text A ends the current chunk and text B is the next sentence. "
    "Answer 1 if B starts a new topic and should begin a new chunk; "
    "answer 2 if B continues A and belongs in the same chunk.\n\n"
)


def sentence_token_ranges(text: str, sentences: Sequence[Span], offsets: Sequence[tuple[int, int]]):
    """For each sentence, the [first, last) LLM token indices whose text lies in it."""
    starts = [s for s, _ in sentences]
    ranges = [[len(offsets), 0] for _ in sentences]
    for t, (a, b) in enumerate(offsets):
        if b <= a:
            continue
        i = bisect_right(starts, b - 1) - 1
        if i >= 0 and a < sentences[i][1]:
            ranges[i][0] = min(ranges[i][0], t)
            ranges[i][1] = max(ranges[i][1], t + 1)
    return [(a, b) if b > a else (0, 0) for a, b in ranges]


def adaptive_boundaries(margins: Sequence[float], window: int = 5) -> list[int]:
    """Sentence indices after which to split: margins[i] is the margin before sentence i + 1."""
    threshold, seen, out = 0.0, [], []
    for i, m in enumerate(margins):
        seen.append(m)
        if m <= threshold:
            out.append(i)
        if len(seen) >= window:
            threshold = sum(seen[-window:]) / window
    return out


class MarginChunker:
    name = "meta-margin"

    def __init__(
        self,
        scorer,
        counter_tokenizer,
        size: int = 200,
        context_tokens: int = 12,
        max_tokens: int = MAX_WORDPIECES,
        splitter: SentenceSplitter | None = None,
        batch: int = 32,
    ):
        self.scorer = scorer
        self.counter_tokenizer = counter_tokenizer
        self.size = size
        self.context_tokens = (
            context_tokens  # LLM tokens of A (chunk tail) and of B (sentence head)
        )
        self.max_tokens = max_tokens
        self.splitter = splitter
        self.batch = batch
        tok = scorer.tokenizer
        self.prefix = tok.header_ids(SYSTEM, INSTRUCTION)
        self.label_a = tok.encode_text("A: ")
        self.label_b = tok.encode_text("\nB: ")
        self.footer = tok.footer_ids(SYSTEM, "")
        self.answers = [tok.encode_text("1")[0], tok.encode_text("2")[0]]

    def margins(self, text: str, sentences: Sequence[Span]) -> list[float]:
        """margins[i]: P(keep) - P(split) for sentence i + 1 following sentence i."""
        ids, offsets = self.scorer.tokenizer.encode_with_offsets(text)
        ranges = sentence_token_ranges(text, sentences, offsets)
        n = self.context_tokens
        queries: dict[
            tuple[int, ...], int
        ] = {}  # identical questions (repeated text) are asked once
        which = []
        for i in range(len(sentences) - 1):
            (a0, a1), (b0, b1) = ranges[i], ranges[i + 1]
            q = tuple(
                self.label_a
                + ids[max(a0, a1 - n) : a1]
                + self.label_b
                + ids[b0 : min(b1, b0 + n)]
                + self.footer
            )
            which.append(queries.setdefault(q, len(queries)))
        probs = self.scorer.next_token_probs(
            self.prefix, list(queries), self.answers, batch=self.batch
        )
        margin = (probs[:, 1] - probs[:, 0]).tolist()
        return [margin[j] for j in which]

    def split(self, text: str) -> list[Span]:
        sentences = split_sentences(text, self.splitter)
        if not sentences:
            return []
        margins = self.margins(text, sentences)
        boundaries = adaptive_boundaries(margins)
        strength = [-m for m in margins] + [0.0]
        counter = TokenCounter(self.counter_tokenizer, text)
        return merge_meta_chunks(
            text, sentences, boundaries, counter, self.size, self.max_tokens, strength
        )
