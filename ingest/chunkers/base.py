"""What every chunker is: text in, exact character spans out."""

from __future__ import annotations

from functools import cached_property
from typing import Protocol

Span = tuple[int, int]  # [start, end) character offsets into the document text


class Chunker(Protocol):
    name: str

    def split(self, text: str) -> list[Span]:
        """Non-overlapping or overlapping spans, in order; `text[start:end]` is each chunk."""
        ...


class Resources:
    """Models a chunker may need, loaded on first use and shared by all chunkers of a run."""

    def __init__(self, settings):
        self.settings = settings

    @cached_property
    def embedder(self):
        from rag.index.embedder import Embedder

        return Embedder(self.settings.embedder, "cpu")

    @cached_property
    def scorer(self):
        """The LLM for chunking decisions, in the engine's dtype (see ingest.lm_scorer)."""
        from ingest.lm_scorer import LMScorer

        return LMScorer.load(self.settings)


def strip_span(text: str, start: int, end: int) -> Span:
    """Shrink a span so it neither starts nor ends with whitespace."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end
