"""Recursive splitting by a separator hierarchy (paragraphs, lines, sentences, words),
then greedy packing.

The baseline of LangChain's RecursiveCharacterTextSplitter as Chroma's report
ran it, measured in embedder wordpieces and on exact spans: a piece larger than
the size is split at the first separator it contains; adjacent pieces are then
packed while they fit.
"""

from __future__ import annotations

import re

from ingest.chunkers.base import Span, strip_span
from ingest.chunkers.merge import TokenCounter

SEPARATORS = ("\n\n", "\n", ". ", "? ", "! ", "。", "；", " ")


class RecursiveChunker:
    name = "recursive"

    def __init__(self, tokenizer, size: int = 200, overlap: int = 0, separators=SEPARATORS):
        if size <= 0 or not 0 <= overlap < size:
            raise ValueError(f"need size > 0 and 0 <= overlap < size, got {size=} {overlap=}")
        self.tokenizer = tokenizer
        self.size = size
        self.overlap = overlap
        self.separators = tuple(separators)

    def _pieces(
        self, text: str, start: int, end: int, level: int, counter: TokenCounter
    ) -> list[Span]:
        """Spans no larger than the size, in order, covering [start, end) (separators stay
        attached)."""
        if counter.count(start, end) <= self.size:
            return [(start, end)]
        if level >= len(self.separators):
            return counter.cut(start, end, self.size)
        sep = self.separators[level]
        cuts = [m.end() for m in re.finditer(re.escape(sep), text[start:end])]
        bounds = [start] + [start + c for c in cuts if start + c < end] + [end]
        if len(bounds) == 2:
            return self._pieces(text, start, end, level + 1, counter)
        out: list[Span] = []
        for a, b in zip(bounds, bounds[1:], strict=False):
            out += self._pieces(text, a, b, level + 1, counter)
        return out

    def split(self, text: str) -> list[Span]:
        counter = TokenCounter(self.tokenizer, text)
        pieces = [
            p for p in self._pieces(text, 0, len(text), 0, counter) if text[p[0] : p[1]].strip()
        ]
        sizes = [counter.count(*p) for p in pieces]
        chunks: list[Span] = []
        i = 0
        while i < len(pieces):
            j, total = i, 0
            while j < len(pieces) and total + sizes[j] <= self.size:
                total += sizes[j]
                j += 1
            j = max(j, i + 1)
            s, e = strip_span(text, pieces[i][0], pieces[j - 1][1])
            if e > s:
                chunks.append((s, e))
            if j >= len(pieces):
                break
            # With overlap, the next chunk starts with as many trailing pieces as fit in it.
            back, kept = j, 0
            while self.overlap and back - 1 > i and kept + sizes[back - 1] <= self.overlap:
                back -= 1
                kept += sizes[back]
            i = back
        return chunks
