"""Fixed windows of embedder wordpieces, with optional overlap (the baseline chunker)."""

from __future__ import annotations

from ingest.chunkers.base import Span, strip_span


class TokenChunker:
    name = "token"

    def __init__(self, tokenizer, size: int = 200, overlap: int = 0):
        if size <= 0 or not 0 <= overlap < size:
            raise ValueError(f"need size > 0 and 0 <= overlap < size, got {size=} {overlap=}")
        self.tokenizer = tokenizer
        self.size = size
        self.overlap = overlap

    def split(self, text: str) -> list[Span]:
        offsets = self.tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True, truncation=False
        )["offset_mapping"]
        spans = []
        step = self.size - self.overlap
        for i in range(0, len(offsets), step):
            window = offsets[i : i + self.size]
            # Extend to the next token's start so no character between windows is lost.
            end = offsets[i + self.size][0] if i + self.size < len(offsets) else len(text)
            start, end = strip_span(text, window[0][0] if i else 0, end)
            if end > start:
                spans.append((start, end))
            if i + self.size >= len(offsets):
                break
        return spans
