"""Chunkers by name. Each returns exact character spans of the text it is given."""

from __future__ import annotations

from ingest.chunkers.base import Chunker, Resources, Span

# Sizes are embedder wordpieces; the Meta-Chunking ones merge meta-chunks up to the size.
CHUNKERS = ("meta-fused", "meta-ppl", "meta-margin", "token", "recursive", "semantic")


def make_chunker(
    name: str, resources: Resources, size: int = 200, overlap: int = 0, **options
) -> Chunker:
    """A chunker by name; `options` go to its constructor (e.g. threshold, max_tokens,
    percentile)."""
    if name == "token":
        from ingest.chunkers.token import TokenChunker

        return TokenChunker(resources.embedder.tokenizer, size, overlap)
    if name == "recursive":
        from ingest.chunkers.recursive import RecursiveChunker

        return RecursiveChunker(resources.embedder.tokenizer, size, overlap)
    if name == "semantic":
        from ingest.chunkers.semantic import SemanticChunker

        return SemanticChunker(resources.embedder, size, **options)
    if name == "meta-ppl":
        from ingest.chunkers.meta_ppl import PerplexityChunker

        return PerplexityChunker(resources.scorer, resources.embedder.tokenizer, size, **options)
    if name == "meta-fused":
        from ingest.chunkers.meta_fused import FusedChunker

        return FusedChunker(resources.scorer, resources.embedder, size, **options)
    if name == "meta-margin":
        from ingest.chunkers.meta_margin import MarginChunker

        return MarginChunker(resources.scorer, resources.embedder.tokenizer, size, **options)
    raise ValueError(f"unknown chunker {name!r}; choose one of {', '.join(CHUNKERS)}")


__all__ = ["CHUNKERS", "Chunker", "Resources", "Span", "make_chunker"]
